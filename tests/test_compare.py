"""`cboprune compare` end to end on a tiny checkpoint: every method at equal M, evaluated, tables written."""

from __future__ import annotations

import csv
import json

import pytest

from cboprune.cli import main

from conftest import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", n_layers=8)


@pytest.fixture(scope="module")
def compare_dir(tiny_checkpoint, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    text = out.parent / "text.txt"  # a short perplexity task (a WikiText document is ~5k tokens)
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 3)
    rc = main(["-q", "compare", "--model", str(tiny_checkpoint), "--data",
               str(shared_data / "calib" / "alpaca_en_demo.json"), "--n-samples", "4", "--seq-len", "32",
               "--batch-size", "4", "--remove", "2", "3", "--cbo-ranks", "0,1", "--tasks", f"file:{text},arc_easy",
               "--limit", "3", "--ppl-limit", "1", "--max-length", "64",
               "--no-speedup",  # half the fixture's time; the compares of test_healing_study measure it
               "--output-dir", str(out)])
    assert rc == 0
    return out


@pytest.mark.slow
def test_compare_writes_tables_plot_and_json(compare_dir, capsys):
    for name in ("table.md", "table.csv", "blocks.md", "blocks.csv", "compare.png", "results.json"):
        assert (compare_dir / name).is_file(), name
    rows = list(csv.reader((compare_dir / "table.csv").open()))
    header, body = rows[0], rows[1:]
    assert header[:3] == ["# br", "method", "calib ppl"] and header[3].endswith("(word_perplexity)")
    methods = ["CBO:0", "CBO:1", "BI one-shot", "BI iterative", "Angular distance", "Norm ratio", "SLEB", "PPL",
               "Taylor+", "SWM", "Last M before final"]
    assert body[0][0] == "0"
    for m in ("2", "3"):
        labels = [r[1].split(" (= ")[0] for r in body if r[0] == m]
        assert labels == methods
    data = json.loads((compare_dir / "results.json").read_text())
    for e in data["entries"]:
        assert len(e["candidate"]["removed"]) == e["n_remove"]
        assert e["eval"]["results"]["arc_easy"]["n"] == 3
        assert e["calib_ppl"] > 0


def test_compare_blocks_table_has_paper_notation(compare_dir):
    rows = {(r[0], r[1]): r for r in csv.reader((compare_dir / "blocks.csv").open())}
    bi = rows[("3", "BI iterative")]
    assert "original:" in bi[3]  # order in shrunk-model indices and in original indices
    swm = rows[("3", "SWM")]
    assert swm[4].startswith("[[")  # merged groups
    data = json.loads((compare_dir / "results.json").read_text())
    entries = {(e["method"], e["n_remove"]): e for e in data["entries"]}
    # Greedy methods are prefix-consistent: the M=2 choice is the first two removals of M=3.
    for method in ("bi-iter", "sleb"):
        assert entries[(method, 2)]["ranking"]["info"]["order"] == entries[(method, 3)]["ranking"]["info"]["order"][:2]
    # CBO runs exactly as `cboprune run`: ranks 0 and 1 of the same exact ranking.
    cbo0, cbo1 = entries[("cbo:0", 3)], entries[("cbo:1", 3)]
    assert cbo0["ranking"]["exact"] and cbo0["candidate"]["score"] <= cbo1["candidate"]["score"]


@pytest.mark.slow
def test_compare_bad_input_gives_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    cases = [(["--methods", "cbo,blockinfluence"], "unknown method"),
             (["--methods", "sleeb"], "did you mean 'sleb'"),
             (["--tasks", "nosuchtask"], "nosuchtask"),
             (["--remove", "0"], "M >= 1"),
             (["--limit", "0"], "--limit")]
    for extra, fragment in cases:
        argv = ["-q", "compare", "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "x")]
        if "--remove" not in extra:
            argv += ["--remove", "2"]
        rc = main(argv + extra)
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "x").exists()


def test_compare_rejects_too_large_m(tiny_checkpoint, shared_data, tmp_path, capsys):
    rc = main(["-q", "compare", "--model", str(tiny_checkpoint), "--remove", "7", "--tasks", "arc_easy", "--seq-len", "32",
               "--data", str(shared_data / "calib" / "alpaca_en_demo.json"), "--output-dir", str(tmp_path / "y")])
    assert rc == 2 and "too large" in capsys.readouterr().err


def test_compare_offers_every_registered_method():
    from cboprune.core import methods
    from cboprune.core.config import Config

    assert Config().methods.split(",") == ["cbo", *methods.names(methods.PEER)]
    assert "last-m" in Config().methods
