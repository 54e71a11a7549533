"""The console script end to end on a tiny checkpoint, and its one-line errors on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cboprune.cli import main
from cboprune.core.ranking import Ranking



@pytest.fixture(scope="module")
def run_dir(tiny_checkpoint, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    rc = main(["-q", "run", "--model", str(tiny_checkpoint), "--data", str(shared_data / "calib" / "alpaca_en_demo.json"),
               "--n-samples", "8", "--seq-len", "48", "--batch-size", "4", "--remove", "2", "3", "--top", "5",
               "--keep", "0,-1", "--save-ranks", "0,1", "--save-remove", "2", "--output-dir", str(out),
               "--energy", "fisher", "--no-verify", "--refine-sweeps", "0"])  # the paper's method, by name
    assert rc == 0
    return out


@pytest.mark.slow
def test_run_writes_every_artifact(run_dir):
    for rel in ["hessian.safetensors", "rankings/M2.json", "rankings/M3.json", "report.md", "summary.json",
                "removal_frequency.png", "hessian.png", "config.yaml", "pruned/M2-rank0/removal.json",
                "pruned/M2-rank1/config.json"]:
        assert (run_dir / rel).is_file(), rel
    assert not (run_dir / "pruned" / "M3-rank0").exists()
    ranking = Ranking.from_dict(json.loads((run_dir / "rankings" / "M3.json").read_text()))
    assert len(ranking) == 4 and ranking.exact  # C(4, 3): blocks 0 and 5 are kept
    energies = [c.score for c in ranking.candidates]
    assert energies == sorted(energies)
    assert all(0 not in c.removed and 5 not in c.removed and len(c.removed) == 3 for c in ranking.candidates)
    report = (run_dir / "report.md").read_text()
    assert "M = 2 of N = 6" in report and "removal_frequency.png" in report
    assert "| 5 | `model.layers.5` | attention |" in report  # the per-block kind table


def test_saved_state_matches_its_ranking_and_reloads(run_dir):
    ranking = json.loads((run_dir / "rankings" / "M2.json").read_text())
    removal = json.loads((run_dir / "pruned" / "M2-rank1" / "removal.json").read_text())
    assert removal["removed"] == ranking["candidates"][1]["removed"]
    assert removal["state_rank"] == 1 and removal["energy"] == ranking["candidates"][1]["score"]
    assert removal["hessian_fingerprint"] and removal["source_model"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "pruned" / "M2-rank1")
    assert model.config.num_hidden_layers == 4
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_solve_and_prune_reuse_the_saved_hessian(run_dir, tiny_checkpoint, tmp_path, capsys):
    assert main(["solve", "--hessian", str(run_dir / "hessian.safetensors"), "--remove", "1", "4", "--top", "3",
                 "--output-dir", str(tmp_path / "solve")]) == 0
    printed = capsys.readouterr().out
    assert "M = 1 of N = 6" in printed and "M = 4 of N = 6" in printed
    assert (tmp_path / "solve" / "rankings" / "M4.json").is_file()
    m4 = json.loads((tmp_path / "solve" / "rankings" / "M4.json").read_text())
    assert main(["-q", "prune", "--model", str(tiny_checkpoint), "--hessian", str(run_dir / "hessian.safetensors"),
                 "--remove", "4", "--rank", "2", "--output-dir", str(tmp_path / "p")]) == 0
    removal = json.loads((tmp_path / "p" / "removal.json").read_text())
    assert removal["removed"] == m4["candidates"][2]["removed"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").config.num_hidden_layers == 2


def _fails(argv, capsys, fragment):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("cboprune: error:"), err
    assert fragment in err, err


def test_bad_input_gives_one_line_errors_and_writes_nothing(tiny_checkpoint, shared_data, tmp_path, capsys):
    out = tmp_path / "out"
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    common = ["-q", "run", "--n-samples", "4", "--seq-len", "32", "--output-dir", str(out)]
    _fails(common + ["--model", str(tmp_path / "missing_model"), "--data", data], capsys, "model path not found")
    _fails(common + ["--model", str(tiny_checkpoint), "--data", data, "--remove", "0"], capsys, "M >= 1")
    _fails(common + ["--model", str(tiny_checkpoint), "--data", data, "--remove", "6"], capsys, "must be below N = 6")
    _fails(common + ["--model", str(tiny_checkpoint), "--data", data, "--keep", "9", "--remove", "2"], capsys, "outside the model")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(common + ["--model", str(tiny_checkpoint), "--data", str(empty), "--remove", "2"], capsys, "holds no records")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    _fails(common + ["--model", str(tiny_checkpoint), "--data", str(short), "--remove", "2"], capsys, "empty or too short")
    bad = tmp_path / "bad.safetensors"
    bad.write_text("garbage")
    _fails(["solve", "--hessian", str(bad), "--remove", "2"], capsys, "not a readable cboprune Hessian")
    _fails(["-q", "prune", "--hessian", str(bad), "--remove", "2", "--output-dir", str(out)], capsys,
           "not a readable cboprune Hessian")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "empty.jsonl", "short.txt"]


def test_yaml_config_with_flags_winning(tmp_path, capsys):
    from cboprune.core.config import RunConfig

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("remove: [3, 5]\ntop: 7\nn-samples: 12\n")
    cfg = RunConfig.from_sources(str(cfg_file), {"top": 4})
    assert cfg.remove == [3, 5] and cfg.top == 4 and cfg.n_samples == 12
    cfg_file.write_text("remove: [3]\nbogus: 1\n")
    _fails(["run", "--config", str(cfg_file)], capsys, "unknown config keys ['bogus']")


def test_every_shipped_config_is_valid_for_its_command():
    """configs/*.yaml name their command in the first line ("cboprune <command> --config ...")."""
    import re
    from pathlib import Path

    from cboprune.core.config import Config

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        command = re.search(r"cboprune (\w+) --config", path.read_text().splitlines()[0]).group(1)
        Config.from_sources(str(path), command=command)  # unknown keys or bad values raise
