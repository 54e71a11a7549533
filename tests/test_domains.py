"""Held-out domains (cboprune.evaluation.domains) and the calibration x method x domain study."""

from __future__ import annotations

import json
import math

import pytest

from cboprune.core.errors import CBOPruneError

from conftest import save_tiny_checkpoint, tiny_llama


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from cboprune.models.loading import resolve_model_source

    return AutoTokenizer.from_pretrained(resolve_model_source("default")[0])


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", n_layers=6)


def test_domain_records_never_overlap_the_calibration(tokenizer, shared_data):
    """A calibration reads a prefix of its seeded shuffle; a domain takes records from the other end."""
    from cboprune.data.calibration import load_calibration, read_records, records_to_messages, render_chat
    from cboprune.evaluation.domains import heldout_records

    path = shared_data / "calib" / "alpaca_en_demo.json"
    cal = load_calibration(str(path), tokenizer, n_samples=40, seq_len=64, seed=3)
    used, total = cal.info["records_used"], cal.info["records_total"]
    assert 40 <= used < total == len(read_records(path))
    rendered = {tokenizer.decode(cal.input_ids[r][cal.attention_mask[r].bool()]) for r in range(cal.n_samples)}
    held = heldout_records(path, seed=3)[:total - used]
    held_text = [render_chat(tokenizer, m) for m in held]
    assert not any(t[:200] in r or r[:200] in t for t in held_text for r in rendered)
    # ...and it is the complement: the records read are exactly the rest
    all_records = records_to_messages(read_records(path), str(path))
    assert len(held) + used == len(all_records)


@pytest.mark.slow
def test_domain_scores_have_standard_errors_and_depend_on_the_model(tokenizer, shared_data):
    from cboprune.evaluation.domains import evaluate_domains, resolve_domains

    domains = resolve_domains("c4,wiki,mmlu,winogrande", data_dir=str(shared_data))
    assert [d.kind for d in domains] == ["records", "documents", "choice", "choice"]
    assert len(domains[2].tasks) == 57
    results = []
    for seed in (0, 1):
        model = tiny_llama(vocab_size=len(tokenizer), seed=seed)
        results.append(evaluate_domains(model, tokenizer, domains, limit=6, max_length=64, data_dir=str(shared_data)))
    a, b = results
    for name in ("c4", "wiki"):
        assert a[name]["n"] == 6 and a[name]["stderr"]["loss"] > 0
        assert math.isclose(a[name]["metrics"]["loss"], math.log(len(tokenizer)), rel_tol=0.2)  # random model
        assert a[name]["metrics"]["loss"] != b[name]["metrics"]["loss"]
    for name in ("mmlu", "winogrande"):
        m = a[name]["metrics"]
        assert a[name]["n"] == 6 and m["gold_ll"] < 0 and 1 <= m["gold_rank"] <= 4
        assert a[name]["stderr"]["gold_ll"] > 0 and 0 <= m["acc"] <= 1
        assert m["gold_choice_lp"] < 0
        if name == "mmlu":  # distinct answers: their probabilities sum to less than one
            assert m["gold_ll"] < m["gold_choice_lp"]
        assert m["gold_ll"] != b[name]["metrics"]["gold_ll"]


def test_mmlu_items_come_round_robin_from_every_subject(shared_data):
    from cboprune.evaluation.data import resolve_eval_dir
    from cboprune.evaluation.domains import choice_items, resolve_domains

    (mmlu,) = resolve_domains("mmlu", data_dir=str(shared_data))
    items = choice_items(mmlu, resolve_eval_dir(str(shared_data)), 60)
    assert len({spec.name for spec, _ in items[:57]}) == 57 and len(items) == 60


@pytest.mark.parametrize("spec, fragment", [
    ("", "--domains is empty"),
    ("c4,c4", "listed twice"),
    ("wikk", "did you mean wiki"),
    ("calib", "needs calibration files"),
    ("/nope/data.jsonl", "unknown domain"),
])
def test_bad_domains_are_one_line_errors(spec, fragment, shared_data):
    from cboprune.evaluation.domains import resolve_domains

    with pytest.raises(CBOPruneError, match=fragment) as info:
        resolve_domains(spec, data_dir=str(shared_data))
    assert "\n" not in str(info.value)


def test_check_heldout_refuses_a_limit_the_calibration_leaves_no_room_for(tokenizer, tmp_path):
    from cboprune.data.calibration import load_calibration
    from cboprune.evaluation.domains import check_heldout, resolve_domains

    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i} twice, please, and then some more words.",
                                        "output": f"{i} {i}, and some more words to pass the minimum."}) + "\n"
                            for i in range(30)))
    cal = load_calibration(str(path), tokenizer, n_samples=20, seq_len=64)
    domains = resolve_domains("calib", data=str(path))
    check_heldout(domains, cal, limit=10)
    with pytest.raises(CBOPruneError, match="too many to hold out 11"):
        check_heldout(domains, cal, limit=11)


def test_the_protocol_adds_domains_without_changing_old_cache_keys(shared_data):
    from cboprune.evaluation.protocol import EvalProtocol

    plain = EvalProtocol("arc_easy", 5, data_dir=str(shared_data))
    assert "domains" not in plain.identity()
    with_domains = EvalProtocol("", domains="wiki,piqa", domain_limit=4, data_dir=str(shared_data))
    assert with_domains.task_names == [] and with_domains.identity()["domain_limit"] == 4
    with pytest.raises(CBOPruneError, match="no evaluation task"):
        EvalProtocol("", data_dir=str(shared_data))


@pytest.mark.slow  # 12 tiny heals, twice: about 3 minutes on 2 shared cores
def test_study_with_calibrations_heal_seeds_and_domains_resumes(tiny_checkpoint, shared_data, tmp_path, monkeypatch):
    """`study --calibrations A B --heal-seeds 0 1`: one study per calibration and seed, every cell healed
    on the same heal data and scored on the same domains, one cross table; a rerun heals nothing."""
    from cboprune.cli import main

    calib = shared_data / "calib"
    mix = f"{calib / 'alpaca_en_demo.json'}:0.5,{calib / 'c4_demo.jsonl'}:0.5"
    out = tmp_path / "dom"
    argv = ["-q", "study", "--model", str(tiny_checkpoint), "--calibrations", str(calib / "alpaca_en_demo.json"), mix,
            "--n-samples", "6", "--heldout-samples", "4", "--seq-len", "32", "--batch-size", "4", "--remove", "2",
            "--top", "3", "--energies", "hybrid", "--refine", "", "--peers", "last-m", "--heal-steps", "1",
            "--heal-seeds", "0,1", "--heal-candidates", "0", "--heal-data", str(calib / "alpaca_eval_gpt4_outputs.json"),
            "--heal-seq-len", "32", "--heal-micro-batch-size", "2", "--heal-global-batch-size", "2",
            "--heal-lr", "1e-3", "--heal-heldout-samples", "8", "--tasks", "", "--domains", "alpaca,c4,wiki,arc_easy", "--domain-limit", "3",
            "--max-length", "64", "--data-dir", str(shared_data), "--output-dir", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "domains.json").read_text())
    cells = result["cells"]
    assert {c["seed"] for c in cells} == {0, 1} and len({c["calibration"] for c in cells}) == 2
    for c in cells:
        assert set(c["after"]["1"] if "1" in c["after"] else c["after"][1]) == {"alpaca", "c4", "wiki", "arc_easy"}
    # the two heal seeds train differently: some after-heal score differs between them
    by_key = {}
    for c in cells:
        after = c["after"].get("1") or c["after"].get(1)
        by_key.setdefault((c["calibration"], c["method"]), []).append(after["c4"]["metrics"]["loss"])
    assert any(len(set(v)) > 1 for v in by_key.values())
    md = (out / "domains.md").read_text()
    assert "after 1 healing steps" in md and "(Δ" in md and "Calibration or search?" in md
    assert "**[default]**" in md and "Verdict" in md
    runs = out.with_name(out.name + ".runs")
    study_md = (runs / "alpaca_en_demo" / "study.md").read_text()
    assert "## Held-out domains" in study_md and "±" in study_md

    import cboprune.heal

    def no_heal(*args, **kwargs):
        raise AssertionError("a finished heal was run again")

    monkeypatch.setattr(cboprune.heal, "heal", no_heal)
    assert main(argv + ["--overwrite"]) == 0


@pytest.mark.parametrize("name", ["study-domains.yaml", "study-domains-gpu.yaml"])
def test_shipped_domain_study_configs_are_runnable_as_written(name, shared_data, tokenizer):
    """Each config is one command: its calibrations and heal data exist, its domains resolve, the heal
    file is none of the domains' (after-heal scores stay held out), and the records each calibration
    reads leave room for the domain's held-out records."""
    import re
    from pathlib import Path

    from cboprune.core.config import Config
    from cboprune.data.calibration import read_records
    from cboprune.data.mix import is_mix, parse_mix
    from cboprune.evaluation.domains import resolve_domains

    repo = Path(__file__).resolve().parents[1]
    path = repo / "configs" / name
    assert re.match(rf"# cboprune study --config configs/{name}$", path.read_text().splitlines()[0])
    cfg = Config.from_sources(str(path), command="study")
    assert len(cfg.calibrations) == 5 and cfg.heal_seeds == [0, 1] and cfg.heal_steps == [30, 120]
    assert cfg.remove == [8, 12] and cfg.tasks == ""
    domains = resolve_domains(cfg.domains, data_dir=str(shared_data))
    assert {d.kind for d in domains} == {"records", "documents", "choice"}
    heal = Path(cfg.heal_data).resolve()
    assert heal.is_file() and heal not in {d.path for d in domains}
    files = set()
    for spec in cfg.calibrations:
        if spec == "generated":
            continue
        files |= {Path(s.spec).resolve() for s in parse_mix(spec)} if is_mix(spec) else {Path(spec).resolve()}
    assert heal not in files
    from cboprune.data.calibration import load_calibration
    from cboprune.evaluation.domains import check_heldout

    for d in domains:  # the calibration of that file alone reads the most of it
        if d.kind == "records" and d.path in files:
            cal = load_calibration(str(d.path), tokenizer, n_samples=cfg.n_samples + cfg.heldout_samples,
                                   seq_len=cfg.seq_len, seed=cfg.seed)
            check_heldout([d], cal, cfg.domain_limit)  # raises when they would overlap
            assert cal.info["records_total"] == len(read_records(d.path))


@pytest.mark.slow
def test_compare_scores_every_configuration_on_the_domains(tiny_checkpoint, shared_data, tmp_path):
    from cboprune.cli import main

    out = tmp_path / "cmp"
    rc = main(["-q", "compare", "--model", str(tiny_checkpoint), "--data", str(shared_data / "calib" / "c4_demo.jsonl"),
               "--n-samples", "4", "--seq-len", "32", "--batch-size", "4", "--remove", "2", "--methods", "bi,last-m",
               "--tasks", "", "--domains", "calib,wiki,piqa", "--domain-limit", "4", "--max-length", "64",
               "--data-dir", str(shared_data), "--output-dir", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["baseline"]["domains"]) == {"calib:c4_demo", "wiki", "piqa"}
    for e in results["entries"]:
        d = e["eval"]["domains"]
        assert d["piqa"]["n"] == 4 and d["wiki"]["stderr"]["loss"] > 0
        assert d["calib:c4_demo"]["metrics"]["loss"] != results["baseline"]["domains"]["calib:c4_demo"]["metrics"]["loss"]
    md = (out / "domains.md").read_text()
    assert "piqa (gold_ll)" in md and "wiki (loss)" in md and " ± " in md and "worst text domain" in md


def test_cross_table_counts_a_difference_only_beyond_the_seed_spread():
    """The verdict: the default loses a domain only when the best other method beats it by more than
    the larger seed spread; the variance split compares the calibration and the method axes."""
    from cboprune.workflows.domain_study import Cell, cross_tables

    def doms(c4, wiki, piqa):
        return {"c4": {"kind": "records", "metrics": {"loss": c4}, "stderr": {"loss": 0.01}, "n": 50},
                "wiki": {"kind": "documents", "metrics": {"loss": wiki}, "stderr": {"loss": 0.01}, "n": 50},
                "piqa": {"kind": "choice", "metrics": {"gold_ll": piqa}, "stderr": {"gold_ll": 0.5}, "n": 50}}

    cells = []
    for cal, shift in (("a.json", 0.0), ("c4.jsonl", 0.3)):
        for seed, noise in ((0, 0.0), (1, 0.02)):
            # the default: better on c4 by 0.1 (beyond the spread 0.02), worse on wiki by 0.01 (within it),
            # worse on piqa by 2 nats (beyond it)
            cells.append(Cell(cal, seed, "hybrid+judge", "default", 8, [1, 2], None,
                              {30: doms(3.0 + shift + noise, 3.51 + shift + noise, -40.0 + noise)}, True))
            cells.append(Cell(cal, seed, "bi-iter", "BI", 8, [3, 4], None,
                              {30: doms(3.1 + shift + noise, 3.5 + shift + noise, -38.0 + noise)}, False))
    md = cross_tables(cells, [30])
    assert "M = 8, after 30 healing steps" in md and "(Δ0.020)" in md
    verdicts = [line for line in md.splitlines() if line.startswith("- ")]
    assert len(verdicts) == 2
    for line in verdicts:
        assert "piqa (BI by 2.000" in line and "wiki" not in line and "better beyond it on 2" in line
    # calibration moves the mean text loss by 0.3; the method by |(3.0+3.51)-(3.1+3.5)|/2 = 0.045
    assert "moves by 0.300 nats across calibrations" in md and "by 0.045 across methods" in md


def test_paired_difference_is_tighter_than_the_standard_errors_of_the_means():
    from cboprune.evaluation.domains import paired_difference

    hard = [1.0, 5.0, 9.0, 2.0, 7.0]  # items of very different difficulty
    a = {"kind": "records", "metrics": {"loss": sum(hard) / 5}, "stderr": {"loss": 1.4}, "items": hard}
    b = {"kind": "records", "metrics": {"loss": sum(hard) / 5 + 0.1}, "stderr": {"loss": 1.4},
         "items": [x + 0.1 + (0.01 if i % 2 else -0.01) for i, x in enumerate(hard)]}
    diff, se = paired_difference(a, b)
    assert diff == pytest.approx(-0.1, abs=0.01) and se < 0.02
    assert paired_difference({**a, "items": None}, b) == (pytest.approx(-0.1), None)
