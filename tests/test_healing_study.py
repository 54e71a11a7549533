"""Judging after healing: compare/study heal every distinct configuration with one recipe, tables
before/after, Spearman, resume from the cache; `run --heal-candidates` picks a state after healing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cboprune.cli import main

from conftest import save_tiny_checkpoint


def _compare(ck, data, text, out, *extra):
    return main(["-q", "compare", "--model", str(ck), "--data", data, "--n-samples", "4", "--seq-len", "32",
                 "--batch-size", "4", "--remove", "2", "--methods", "cbo,bi,sleb,last-m", "--tasks", f"file:{text}",
                 "--ppl-limit", "1", "--max-length", "64", "--heal-steps", "1", "2", "--heal-seq-len", "32",
                 "--heal-micro-batch-size", "2", "--heal-global-batch-size", "2", "--heal-lr", "1e-3",
                 "--heal-heldout-samples", "8", "--output-dir", str(out), *extra])


@pytest.mark.slow
def test_compare_heals_every_distinct_configuration_alike_and_resumes(tiny_checkpoint, shared_data, tmp_path,
                                                                      monkeypatch):
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 3)
    out = tmp_path / "cmp"
    assert _compare(tiny_checkpoint, data, text, out) == 0
    results = json.loads((out / "results.json").read_text())
    entries = results["entries"]
    assert results["meta"]["healing"]["steps"] == [1, 2] and results["meta"]["healing"]["heldout_samples"] == 8
    distinct = {}
    for e in entries:
        assert set(e["healed"]) == {"1", "2"}, e["method"]
        for h in e["healed"].values():
            assert h["nll"] > 0 and h["heal_ce"] > 0 and "results" in h["eval"]
        distinct.setdefault(tuple(e["candidate"]["removed"]), e["healed"])
    for e in entries:  # configurations equal across methods share one heal
        assert e["healed"] == distinct[tuple(e["candidate"]["removed"])]
    md = (out / "healing.md").read_text()
    assert "NLL after 2" in md and "ρ(pre, post 1)" in md and "Last M before final" in md
    assert "selection cost (fwd passes)" in md
    assert "cost (fwd passes)" in (out / "table.md").read_text()
    cache = out.with_name(out.name + ".heal-cache")
    assert len(list(cache.glob("*.json"))) == 2 * len(distinct)
    assert not out.with_name(out.name + ".heal-work").exists()

    import cboprune.heal

    real_heal = cboprune.heal.heal

    def no_heal(*args, **kwargs):
        raise AssertionError("a cached configuration was healed again")

    monkeypatch.setattr("cboprune.heal.heal", no_heal)
    assert _compare(tiny_checkpoint, data, text, out, "--overwrite") == 0  # resumed entirely from the cache
    again = json.loads((out / "results.json").read_text())["entries"]
    assert [e["healed"] for e in again] == [e["healed"] for e in entries]
    # a damaged cache entry is healed again, not trusted and not a traceback
    calls = []
    monkeypatch.setattr("cboprune.heal.heal", lambda *a, **k: calls.append(1) or real_heal(*a, **k))
    victim = sorted(cache.glob("*.json"))[0]
    victim.write_text("{broken")
    assert _compare(tiny_checkpoint, data, text, out, "--overwrite") == 0
    assert len(calls) == 1 and isinstance(json.loads(victim.read_text()), dict)


def test_heal_options_are_checked_before_any_work(tiny_checkpoint, tmp_path, capsys):
    for extra, fragment in [(["--heal-steps", "0"], "--heal-steps must be positive"),
                            (["--heal-steps", "5", "--data", str(tmp_path / "none.json")], "not found")]:
        rc = main(["-q", "compare", "--model", str(tiny_checkpoint), "--remove", "2", "--methods", "bi",
                   "--output-dir", str(tmp_path / "x"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_run_chooses_the_saved_state_after_a_short_heal(tiny_checkpoint, shared_data, tmp_path):
    out = tmp_path / "run"
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    assert main(["-q", "run", "--model", str(tiny_checkpoint), "--data", data, "--n-samples", "6", "--seq-len", "32",
                 "--batch-size", "3", "--remove", "2", "--top", "6", "--heldout-samples", "3", "--energy", "fisher",
                 "--refine-sweeps", "0", "--heal-candidates", "3", "--judge-steps", "2", "--heal-seq-len", "32",
                 "--output-dir", str(out)]) == 0
    ranking = json.loads((out / "rankings" / "M2.json").read_text())
    judge = ranking["info"]["heal_judge"]
    assert len(judge["order"]) == 3 and judge["healed_ce"] == sorted(judge["healed_ce"])
    assert judge["forward_passes"] > 0 and judge["recipe"]["heldout_eval"] == "after-ce"
    assert judge["steps"] == 2 and judge["recipe"]["heldout_samples"] == 25  # the judge's own recipe
    assert judge["recipe"]["learning_rate"] == 2e-4 and judge["recipe"]["seq_len"] == 32
    from cboprune.selection.hessian import load_hessian

    H = load_hessian(out / "hessian.safetensors").H
    for cand, energy in zip(ranking["candidates"], ranking["info"]["verification"]["energies"]):
        assert energy == pytest.approx(float(H[np.ix_(cand["removed"], cand["removed"])].sum()), rel=1e-6)
    assert [c["removed"] for c in ranking["candidates"][:3]] == judge["order"]
    removal = json.loads((out / "pruned" / "M2-rank0" / "removal.json").read_text())
    assert removal["removed"] == judge["order"][0]  # the winner after healing is the saved state
    report = (out / "report.md").read_text()
    assert "Chosen after a short heal" in report and "Selection cost" in report
    assert "All M together" in report and "| M | selection | judge | forward passes |" in report
    lines = report.splitlines()
    judge_row = lines[lines.index("| M | selection | judge | forward passes |") + 2]
    selection, judged, total = (float(v) for v in judge_row.strip("|").split("|")[1:])
    assert judged == pytest.approx(judge["forward_passes"], abs=0.06) and total == pytest.approx(selection + judged,
                                                                                               abs=0.11)
    assert not list(out.rglob(".heal-judge"))


@pytest.mark.slow
@pytest.mark.parametrize("extra, judged", [([], 0), (["--heal-candidates", "2"], 2)])
def test_run_judges_the_best_verified_states_only_when_asked(
        tiny_checkpoint, shared_data, tmp_path, extra, judged):
    out = tmp_path / "run"
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    assert main(["-q", "run", "--model", str(tiny_checkpoint), "--data", data, "--n-samples", "6", "--seq-len", "32",
                 "--batch-size", "3", "--remove", "2", "--top", "4", "--heldout-samples", "3",
                 "--refine-sweeps", "0", "--judge-steps", "1", "--no-speedup", "--output-dir", str(out), *extra]) == 0
    ranking = json.loads((out / "rankings" / "M2.json").read_text())
    judge = ranking["info"].get("heal_judge")
    assert (len(judge["order"]) if judge else 0) == judged
    assert ("Chosen after a short heal" in (out / "report.md").read_text()) == bool(judged)


@pytest.mark.slow
def test_compare_heals_from_one_teacher_pass_with_the_teacher_cache(tiny_checkpoint, shared_data, tmp_path):
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 3)
    out = tmp_path / "cmp"
    assert _compare(tiny_checkpoint, data, text, out, "--heal-teacher-cache") == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["healing"]["teacher_outputs"] == "cached top-64"
    heals = {}
    for e in results["entries"]:
        for steps, h in e["healed"].items():
            heals[(tuple(e["candidate"]["removed"]), steps)] = h
    computed = [h["teacher_samples_computed"] for h in heals.values()]
    # The first configuration's two budgets compute the rows they visit; every later heal computes none.
    assert len(heals) >= 6 and max(computed) > 0 and sum(1 for c in computed if c) <= 2, computed
    assert len(list(out.with_name("cmp.teacher-cache").glob("*/meta.json"))) == 1


def _forbid_recomputation(monkeypatch):
    """Make every selection, evaluation and heal fail if it runs."""
    def fail(*args, **kwargs):
        raise AssertionError("a finished step was computed again")

    for target in ("cboprune.heal.heal", "cboprune.engine.experiment.energy_entries", "cboprune.engine.experiment.peer_entries",
                   "cboprune.evaluation.protocol.EvalProtocol.evaluate", "cboprune.models.masked.calibration_nll",
                   "cboprune.engine.judge.judge_by_healing"):
        monkeypatch.setattr(target, fail)


@pytest.mark.slow
def test_study_heals_the_lowest_states_correlates_their_energy_and_resumes_without_redoing_anything(
        tiny_checkpoint, shared_data, tmp_path, monkeypatch):
    """--heal-states K: every energy model's K lowest states are healed alike, and healing.md gives the
    Spearman correlation of the energy with the loss after healing (NLL and heal CE) as results.json
    lets one recompute it. An interrupted study resumes: no selection, evaluation or heal is redone;
    a damaged or wrongly shaped kept step is computed again."""
    import shutil

    from scipy.stats import spearmanr

    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 3)
    out = tmp_path / "study"
    argv = ["-q", "study", "--model", str(tiny_checkpoint), "--data", data, "--n-samples", "6",
            "--heldout-samples", "3", "--seq-len", "32", "--batch-size", "3", "--remove", "2", "--top", "4",
            "--energies", "fisher,hybrid", "--refine", "", "--peers", "bi,sleb", "--heal-states", "4",
            "--heal-steps", "1", "--heal-candidates", "2", "--judge-steps", "1", "--heal-seq-len", "32",
            "--heal-micro-batch-size", "2", "--heal-global-batch-size", "2", "--heal-lr", "1e-3",
            "--tasks", f"file:{text}", "--ppl-limit", "1",
            "--max-length", "64", "--heal-heldout-samples", "8", "--output-dir", str(out)]
    assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    entries = first["entries"]
    assert any(e["method"] == "hybrid+judge" for e in entries)  # the judge's heals are a step too
    for e in entries:
        assert e["healed"]["1"]["heal_ce"] > 0 and e["healed"]["1"]["heal_ce_before"] > 0
    healing_md = (out / "healing.md").read_text()
    assert "heal CE before" in healing_md and "ρ(pre, post 1) heal CE" in healing_md
    for name in ("fisher", "hybrid"):
        states = sorted((e for e in entries if e["method"].startswith(f"{name}:")), key=lambda e: int(e["method"][len(name) + 1:]))
        assert [e["method"] for e in states] == [f"{name}:{r}" for r in range(4)]
        ranking = states[0]["ranking"]["candidates"]
        assert [e["candidate"]["removed"] for e in states] == [c["removed"] for c in ranking[:4]]
        energies = [e["candidate"]["score"] for e in states]
        assert energies == sorted(energies)
        expected = [spearmanr(energies, values).statistic for values in (
            [e["heldout_nll"] for e in states], [e["healed"]["1"]["nll"] for e in states],
            [e["healed"]["1"]["heal_ce"] for e in states])]
        row = next(line for line in healing_md.splitlines() if line.startswith(f"| {name} | 2 |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == "4"
        assert [float(c) for c in cells[3:6]] == pytest.approx(expected, abs=0.006)

    steps = out.with_name(out.name + ".heal-cache") / "steps"
    assert len(list(steps.glob("*.json"))) >= 6  # 2 energies, the judge, 2 peers, the original, evaluations
    # the study was stopped before writing its outputs: a rerun computes nothing again
    shutil.rmtree(out)
    with monkeypatch.context() as patch:
        _forbid_recomputation(patch)
        assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["entries"] == first["entries"] and again["baseline"] == first["baseline"]
    assert again["correlations"] == first["correlations"]
    assert (out / "healing.md").read_text() == healing_md
    # damaged step files, and JSON objects of the wrong shape: computed again, never a traceback
    files = sorted(steps.glob("*.json"))
    for i, path in enumerate(files):
        path.write_text(["{broken", "[1, 2]", json.dumps({"entries": 5, "nll": "x", "eval": 1}),
                         json.dumps({"entries": [{"method": "x"}]}),
                         json.dumps({"nll": 1.0, "eval": {"results": {}}, "rankings": {}, "correlations": 3})][i % 5])
    assert main(argv + ["--overwrite"]) == 0
    rewritten = [json.loads(p.read_text()) for p in files]
    assert all(isinstance(d, dict) and d.get("entries") not in (5, [{"method": "x"}]) and d.get("nll") != "x"
               and d.get("correlations") != 3 for d in rewritten)

    def picks(entries):  # the same picks and heals, new wall times
        return [(e["method"], e["candidate"]["removed"], e["healed"]["1"]["heal_ce"]) for e in entries]

    assert picks(json.loads((out / "results.json").read_text())["entries"]) == picks(first["entries"])


@pytest.mark.slow
def test_compare_resumes_but_never_reuses_results_of_other_weights_at_the_same_path(shared_data, tmp_path,
                                                                                    monkeypatch):
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 3)
    ck = tmp_path / "model"
    save_tiny_checkpoint(ck, n_layers=5, seed=0)
    out = tmp_path / "cmp"
    few = ("--methods", "cbo,bi", "--heal-steps", "1", "--no-speedup")  # what is cached does not depend on how many
    assert _compare(ck, data, text, out, *few) == 0
    first = json.loads((out / "results.json").read_text())
    with monkeypatch.context() as patch:
        _forbid_recomputation(patch)
        assert _compare(ck, data, text, out, *few, "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["entries"] == first["entries"]
    save_tiny_checkpoint(ck, n_layers=5, seed=1)  # other weights, same path and configuration
    import cboprune.heal

    real_heal, calls = cboprune.heal.heal, []
    monkeypatch.setattr("cboprune.heal.heal", lambda *a, **k: calls.append(1) or real_heal(*a, **k))
    assert _compare(ck, data, text, out, *few, "--overwrite") == 0
    assert calls and json.loads((out / "results.json").read_text())["baseline"] != first["baseline"]


@pytest.mark.slow
def test_a_study_killed_during_a_heal_resumes(tiny_checkpoint, shared_data, tmp_path, monkeypatch):
    """A training state left in the work directory (a kill during a heal that saved one; a study's heals
    save none now) does not stop the rerun: it heals that configuration again instead of refusing
    ('holds an unfinished healing run')."""
    from pathlib import Path

    import cboprune.heal

    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 3)
    out = tmp_path / "cmp"
    real_heal = cboprune.heal.heal

    def killed(cfg, *args, **kwargs):  # as a kill after the first saved state would leave it
        (Path(cfg.output_dir + ".heal-state") / "latest").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr("cboprune.heal.heal", killed)
    few = ("--methods", "cbo,bi", "--heal-steps", "1", "--no-speedup")
    assert _compare(tiny_checkpoint, data, text, out, *few) == 130  # "cboprune: interrupted"
    assert list(out.with_name(out.name + ".heal-work").glob("*.heal-state"))
    monkeypatch.setattr("cboprune.heal.heal", real_heal)
    assert _compare(tiny_checkpoint, data, text, out, *few) == 0
    assert not out.with_name(out.name + ".heal-work").exists()


def test_a_kept_selection_step_is_keyed_by_its_method_scheme(tmp_path, monkeypatch):
    """A study's kept selection step is not reused once the method's algorithm (its `scheme`) changed,
    and a peer's key leaves the energy-only search settings out."""
    from dataclasses import replace

    from cboprune.core import methods
    from cboprune.engine.resume import StepCache
    from cboprune.engine.skeleton import ExperimentRun

    run = ExperimentRun(cfg=None, command="study", protocol=None, out_dir=tmp_path, recipe=None, session=None,
                        context=None, steps=StepCache(tmp_path / "steps"), weights="w",
                        step_fields={"command": "study", "settings": {"recentre": 1, "top": 4}}, started=0.0)
    computed = []

    def compute():
        computed.append(1)
        return len(computed), {"value": len(computed)}

    def parse(v):
        return v["value"]

    assert run.step("energy", "hybrid", parse, compute) == 1
    assert run.step("energy", "hybrid", parse, compute) == 1 and run.kept("energy", "hybrid", parse) == 1
    assert run.step_key("energy", "hybrid")["scheme"] == methods.get("hybrid").scheme != ""
    monkeypatch.setitem(methods._REGISTRY, "hybrid", replace(methods.get("hybrid"), scheme="another algorithm"))
    assert run.kept("energy", "hybrid", parse) is None
    assert run.step("energy", "hybrid", parse, compute) == 2 and len(computed) == 2
    assert "recentre" not in run.step_key("peer", "sleb")["settings"]
    assert run.step_key("energy", "hybrid")["settings"]["recentre"] == 1
