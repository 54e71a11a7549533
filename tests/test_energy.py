"""Energy models, verification by held-out loss, swap refinement and the `study` command."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import save_tiny_checkpoint, tiny_llama

from cboprune.cli import main
from cboprune.data.calibration import CalibrationSet
from cboprune.core.ranking import contiguous_runs
from cboprune.selection.energy import (
    EnergyModel,
    from_hessian,
    measure_losses,
    relinearized_rankings,
    spearman,
)
from cboprune.models.gating import GateManager
from cboprune.selection.hessian import compute_hessian, per_sample_loss
from cboprune.models.masked import calibration_nll, configurations_nll
from cboprune.models.architectures import blocks
from cboprune.core.ranking import Candidate, Ranking
from cboprune.selection.verify import diverse, jaccard, refine, verify, with_refined


def _calibration(n: int, seq: int = 12, vocab: int = 128, seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::3, seq - 3:] = 0  # some right padding
    return CalibrationSet(ids, mask, "random")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_layers=6)


@pytest.fixture(scope="module")
def calib():
    return _calibration(6)


def test_configurations_nll_equals_one_pass_per_configuration(model, calib):
    configs = [(), (1,), (0, 4), (2, 3, 5)]
    batched = configurations_nll(model, calib, configs, batch_size=4, rows_per_pass=8)
    for c, v in zip(configs, batched):
        assert v == pytest.approx(calibration_nll(model, calib, removed=c, batch_size=2), rel=1e-5)
    assert len(set(np.round(batched, 6))) == len(configs)  # the configurations really differ


def test_measured_model_is_exact_on_single_and_pair_removals(model, calib):
    measured = measure_losses(model, calib, batch_size=3)
    em = measured.energy_model()
    base = calibration_nll(model, calib)
    for removed in [(2,), (5,), (1, 4), (0, 3)]:
        true = calibration_nll(model, calib, removed=removed)
        assert em.energy(removed) == pytest.approx(true - base, abs=1e-5)
    assert measured.configurations == 1 + 6 + 15


def test_measured_pool_restricts_pairs_and_removable_blocks(model, calib):
    measured = measure_losses(model, calib, pool_size=3, keep=[0])
    cheapest = [i for i in np.argsort(measured.single) if i != 0][:3]
    assert measured.pool == sorted(int(i) for i in cheapest)
    assert measured.configurations == 1 + 6 + 3
    ranking = measured.energy_model().rank(2, 3)
    assert all(set(c.removed) <= set(measured.pool) for c in ranking.candidates)


def test_fisher_linear_is_the_taylor_expansion(model, calib):
    h = compute_hessian(model, calib, batch_size=3, progress=False)
    fl = from_hessian(h, "fisher-linear")
    fisher = from_hessian(h, "fisher")
    np.testing.assert_allclose(fl.Q, 0.5 * h.matrix("fisher"))
    np.testing.assert_allclose(fl.linear, -h.grad_mean)
    x = np.zeros(6)
    x[[1, 3]] = 1
    assert fisher.energy((1, 3)) == pytest.approx(x @ h.matrix("fisher") @ x)
    assert fl.energy((1, 3)) == pytest.approx(-h.grad_mean @ x + 0.5 * x @ h.matrix("fisher") @ x)
    assert fisher.rank(2, 3).method == "cbo" and fl.rank(2, 3).method == "cbo-fisher-linear"


def test_gradient_at_a_removed_point_matches_finite_differences(model, calib):
    """Re-linearization expands at alpha with block 2 off: its gradient is the derivative there."""
    h = compute_hessian(model, calib, batch_size=6, progress=False, at_removed=[2])
    assert h.meta["at_removed"] == [2]
    gates = GateManager(model, blocks(model))
    ids, mask = calib.input_ids, calib.attention_mask

    def loss(alpha):
        gates.set(alpha)
        with torch.no_grad():
            return float(per_sample_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask).double().mean())

    try:
        base = torch.ones(6, dtype=torch.float64)
        base[2] = 0
        for i in (0, 4):
            eps = 1e-3
            up, down = base.clone(), base.clone()
            up[i] += eps
            down[i] -= eps
            fd = (loss(up.float()) - loss(down.float())) / (2 * eps)
            assert h.grad_mean[i] == pytest.approx(fd, rel=2e-2, abs=1e-4)
    finally:
        gates.remove()


def test_relinearized_path_keeps_earlier_removals(model, calib):
    rankings = relinearized_rankings(model, calib, [1, 3], 4, step=1, batch_size=3)
    first = rankings[1].best.removed
    assert all(set(first) <= set(c.removed) for c in rankings[3].candidates)
    assert rankings[3].method == "cbo-relinearized"
    assert len(rankings[3].info["energy_expansion_points"]) == 3


def test_verify_reorders_by_measured_heldout_loss(model, calib):
    heldout = _calibration(4, seed=1)
    em = EnergyModel("test", np.eye(6), np.arange(6.0))
    ranking = em.rank(2, 6)
    verified = verify(model, heldout, ranking, batch_size=2)
    scores = [c.score for c in verified.candidates]
    assert scores == sorted(scores) and [c.rank for c in verified.candidates] == list(range(6))
    for c in verified.candidates:
        assert c.score == pytest.approx(calibration_nll(model, heldout, removed=c.removed), rel=1e-5)
    v = verified.info["verification"]
    assert sorted(v["energy_ranks"]) == list(range(6))
    assert v["energies"] == [ranking.candidates[r].score for r in v["energy_ranks"]]
    assert -1 <= v["spearman"] <= 1


def test_refine_never_ends_worse_and_finds_the_best_swap(model, calib):
    heldout = _calibration(4, seed=1)
    bad = Ranking("cbo", 6, 2, [Candidate((0, 1), 0.0, 0)])  # blocks 0 and 1: a poor start on purpose
    verified = verify(model, heldout, bad)
    refined = refine(model, calib, heldout, verified, max_sweeps=5)
    r = refined.info["refine"]
    assert r["fitting_nll"] == sorted(r["fitting_nll"], reverse=True)  # every accepted swap improved
    assert refined.best.score <= verified.best.score
    if r["sweeps"] < 5:  # converged: no single swap improves the fitting loss
        current = set(r["path"][-1])
        swaps = [tuple(sorted(current - {i} | {j})) for i in current for j in set(range(6)) - current]
        assert min(configurations_nll(model, calib, swaps)) >= r["fitting_nll"][-1] - 1e-9
    merged = with_refined(verified, refined, 1.5)
    assert merged.best.removed == refined.best.removed and [c.rank for c in merged.candidates] == list(
        range(len(merged.candidates)))
    assert len(merged.info["verification"]["energies"]) == len(merged.candidates)


def test_diverse_keeps_ground_state_and_bounds_jaccard():
    cands = [Candidate(tuple(c), float(i), i) for i, c in enumerate([(0, 1, 2), (0, 1, 3), (4, 5, 6), (0, 4, 5),
                                                                    (7, 8, 9)])]
    ranking = Ranking("cbo", 10, 3, cands)
    d = diverse(ranking, 3, max_jaccard=0.25)
    assert d.best.removed == (0, 1, 2)
    assert all(jaccard(a.removed, b.removed) <= 0.25 for i, a in enumerate(d.candidates) for b in d.candidates[:i])
    assert [c.removed for c in d.candidates] == [(0, 1, 2), (4, 5, 6), (7, 8, 9)]


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 2], [1, 2]))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", n_layers=8)


@pytest.mark.slow
def test_study_end_to_end(tiny_checkpoint, shared_data, tmp_path):
    out = tmp_path / "study"
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 3)
    rc = main(["-q", "study", "--model", str(tiny_checkpoint), "--data",
               str(shared_data / "calib" / "alpaca_en_demo.json"), "--n-samples", "6", "--heldout-samples", "4",
               "--seq-len", "32", "--batch-size", "4", "--remove", "2", "3", "--top", "4", "--refine-sweeps", "2",
               "--exact-samples", "3", "--peers", "bi,sleb,swm", "--tasks", f"file:{text},arc_easy", "--limit", "2",
               "--ppl-limit", "1", "--max-length", "64", "--heal-candidates", "2", "--output-dir", str(out)])
    assert rc == 0
    for name in ("study.md", "study.csv", "results.json", "energy_vs_loss.png", "frequency_measured.png",
                 "frequency_fisher.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "results.json").read_text())
    methods = {(e["method"], e["n_remove"]) for e in data["entries"]}
    for m in (2, 3):
        for name in ("fisher", "fisher-linear", "exact", "measured", "relinearized"):
            assert (f"{name}:0", m) in methods and (f"{name}+verify", m) in methods
        assert ("measured+refine", m) in methods and ("sleb", m) in methods
    for e in data["entries"]:
        assert len(e["candidate"]["removed"]) == e["n_remove"]
        assert e["heldout_nll"] is not None and "results" in e["eval"]
    by = {(e["method"], e["n_remove"]): e for e in data["entries"]}
    for name in data["correlations"]:
        for m in (2, 3):  # the verified pick is the best of the K verified states, ground state included
            assert by[(f"{name}+verify", m)]["heldout_nll"] <= by[(f"{name}:0", m)]["heldout_nll"] + 1e-12
            assert by[("measured+refine", m)]["heldout_nll"] <= by[("measured+verify", m)]["heldout_nll"] + 1e-12
    md = (out / "study.md").read_text()
    assert "Spearman" in md and "[recommended]" in md and "beats every peer" in md
    # `run`'s judge (--heal-candidates 2, local data): its pick is the recommended row, one of the two
    # best verified states, and it costs the verification plus its heals.
    assert data["meta"]["recommended"] == "hybrid+judge" and "short-heal judge" in md
    for m in (2, 3):
        judged, verified = by[("hybrid+judge", m)], by[("hybrid+verify", m)]
        info = judged["ranking"]["info"]["heal_judge"]
        assert info["steps"] == 3 and len(info["order"]) == 2 and judged["candidate"]["removed"] == info["order"][0]
        assert judged["cost_forward_passes"] == pytest.approx(verified["cost_forward_passes"] + info["forward_passes"])
        assert info["forward_passes"] > 0
    assert not (tmp_path / "study.judge-work").exists()


def test_study_bad_input_gives_one_line_errors(tiny_checkpoint, tmp_path, capsys):
    cases = [(["--energies", "fisher,curvature"], "unknown energy model"),
             (["--peers", "sleeb"], "did you mean 'sleb'"),
             (["--remove", "0"], "M >= 1"),
             (["--diverse", "1.5"], "--diverse"),
             (["--energies", "fisher", "--run-cost", "0.5"], "--energies leaves out")]
    for extra, fragment in cases:
        rc = main(["-q", "study", "--model", str(tiny_checkpoint), "--output-dir", str(tmp_path / "x")] + extra)
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, (extra, err)
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_run_default_is_the_recommended_approach_and_paper_stays_available(tiny_checkpoint, shared_data, tmp_path):
    from cboprune.selection.energy import PAPER, RECOMMENDED

    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    common = ["-q", "run", "--model", str(tiny_checkpoint), "--data", data, "--n-samples", "6", "--seq-len", "32",
              "--batch-size", "3", "--remove", "2", "--top", "4", "--save-remove", "2", "--heldout-samples", "3",
              "--heal-candidates", "0"]  # the verified order itself (the judge has its own test)
    assert main(common + ["--output-dir", str(tmp_path / "rec"), "--refine-sweeps", "1"]) == 0
    ranking = json.loads((tmp_path / "rec" / "rankings" / "M2.json").read_text())
    assert ranking["method"] == f"cbo-{RECOMMENDED.energy}"
    assert "verification" in ranking["info"] and "refine" in ranking["info"]
    scores = [c["score"] for c in ranking["candidates"][1:]]
    assert scores == sorted(scores)  # verified states by held-out NLL (the refined state, if any, first)
    removal = json.loads((tmp_path / "rec" / "pruned" / "M2-rank0" / "removal.json").read_text())
    assert removal["removed"] == ranking["candidates"][0]["removed"]
    assert "held-out NLL" in (tmp_path / "rec" / "report.md").read_text()

    assert PAPER.energy == "fisher" and not PAPER.verify and PAPER.refine_sweeps == 0
    assert main(common + ["--output-dir", str(tmp_path / "paper"), "--energy", "fisher", "--no-verify",
                          "--refine-sweeps", "0"]) == 0
    paper = json.loads((tmp_path / "paper" / "rankings" / "M2.json").read_text())
    assert paper["method"] == "cbo" and "verification" not in paper["info"]
    energies = [c["score"] for c in paper["candidates"]]
    assert energies == sorted(energies)


def test_run_rejects_unknown_energy_and_bad_selection_settings(tmp_path, capsys):
    for extra, fragment in [(["--energy", "curvature"], "energy must be one of"),
                            (["--refine-sweeps", "-1"], "--refine-sweeps must be"),
                            (["--heldout-samples", "0"], "--heldout-samples must be"),
                            (["--pool", "3", "--remove", "4"], "pool must be"),
                            (["--energy", "fisher", "--run-cost", "0.5"], "--run-cost is an option of the hybrid"),
                            (["--run-cost", "-1"], "--run-cost must be")]:
        rc = main(["-q", "run", "--output-dir", str(tmp_path / "x")] + extra)
        err = capsys.readouterr().err
        assert rc == 2 and fragment in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "x").exists()


def test_solve_command_builds_any_hessian_energy(tmp_path, capsys):
    from cboprune.selection.hessian import save_hessian

    model = tiny_llama(n_layers=6)
    h = compute_hessian(model, _calibration(5), batch_size=5, progress=False)
    path = save_hessian(h, tmp_path / "h.safetensors")
    out = tmp_path / "solve"
    assert main(["solve", "--hessian", str(path), "--remove", "2", "--top", "3", "--energy", "fisher-linear",
                 "--output-dir", str(out), "--export-qubo", str(tmp_path / "q")]) == 0
    ranking = json.loads((out / "rankings" / "M2.json").read_text())
    fl = from_hessian(h, "fisher-linear")
    assert ranking["method"] == "cbo-fisher-linear"
    assert ranking["candidates"][0]["score"] == pytest.approx(min(
        fl.energy((a, b)) for a in range(6) for b in range(a + 1, 6)))
    qubo = json.loads((tmp_path / "q-M2.json").read_text())
    assert qubo  # the penalty QUBO of the same model was written
    capsys.readouterr()


def test_run_says_when_data_is_too_small_to_hold_samples_out(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {i} things about cats.",
                                        "output": "Cats are small carnivorous mammals. " * 3}) + "\n" for i in range(3)))
    rc = main(["-q", "run", "--model", str(tiny_checkpoint), "--data", str(data), "--n-samples", "3",
               "--seq-len", "32", "--remove", "2", "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "not enough for 3 fitting + 16 held-out" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_hybrid_energy_is_exact_on_single_removals_and_takes_fisher_pairs(model, calib):
    from cboprune.core import methods
    from cboprune.engine.experiment import SelectionContext, select

    context = SelectionContext(model, calib, batch_size=3, top=4, options={"single_samples": 4, "run_cost": 0})
    by_m = select("hybrid", context, [1, 2])
    energy = context.energy_models["hybrid"]
    subset = calib.split(4)[0]
    base, *single = configurations_nll(model, subset, [()] + [(i,) for i in range(6)], batch_size=3)
    for i in range(6):  # every single removal is the measured loss increase on the subset
        assert energy.energy([i]) == pytest.approx(single[i] - base, abs=1e-9)
    F = context.hessian().matrix("fisher")
    pair = energy.energy([1, 4]) - energy.energy([1]) - energy.energy([4])
    assert pair == pytest.approx(F[1, 4], rel=1e-9)  # the interaction is the Fisher's
    assert by_m[1].best.removed == (int(np.argmin(np.asarray(single) - base)),)
    assert [c.score for c in by_m[2].candidates] == sorted(c.score for c in by_m[2].candidates)
    assert methods.get("hybrid").cost(30, 8) == pytest.approx(3 + 31 * 0.125)


def test_recentred_energy_is_exact_one_flip_from_its_centre_and_verification_merges_its_states(model, calib):
    from cboprune.core import methods
    from cboprune.energies.hybrid import recentred_energy
    from cboprune.engine.experiment import SelectionContext, energy_states, select

    context = SelectionContext(model, calib, batch_size=3, top=4, options={"single_samples": 4, "run_cost": 0.5})
    select("hybrid", context, [2])
    base = context.energy_models["hybrid"]
    lam = base.info["run_cost_nats"]
    centre = (1, 2)
    local, at = recentred_energy(context, base, centre)
    subset = calib.split(4)[0]
    flips = [tuple(sorted(set(centre) ^ {i})) for i in range(6)]
    measured = configurations_nll(model, subset, [centre] + flips, batch_size=3)
    assert at == pytest.approx(measured[0], abs=1e-9)
    for state, loss in zip(flips, measured[1:]):  # exact on every state one flip away (run cost aside)
        runs = contiguous_runs(state) - contiguous_runs(centre)
        assert local.energy(state) - local.energy(centre) == pytest.approx(loss - at + lam * runs, abs=1e-9)
    F = context.hessian().matrix("fisher")  # two flips add the Fisher's interaction
    two = (1, 4)  # restore 2, remove 4
    expect = (measured[1 + 2] - at) + (measured[1 + 4] - at) - F[2, 4] + lam * (contiguous_runs(two) - 1)
    assert local.energy(two) - local.energy(centre) == pytest.approx(expect, abs=1e-9)

    plain = SelectionContext(model, calib, heldout=calib, batch_size=3,
                             options={"single_samples": 4, "run_cost": 0.5, "recentre": 0})
    recentred = SelectionContext(model, calib, heldout=calib, batch_size=3,
                                 options={"single_samples": 4, "run_cost": 0.5})  # default: one round
    (before,) = energy_states("hybrid", plain, [3], top=3, verify=True)[0].values()
    (after,) = energy_states("hybrid", recentred, [3], top=3, verify=True)[0].values()
    assert "recentre" not in before.verified.info
    info = after.verified.info
    assert info["recentre"]["rounds"] == 1 and info["recentre"]["path"][0] == list(before.verified.best.removed)
    scores = [c.score for c in after.verified.candidates]
    assert scores == sorted(scores) and len(scores) == 3 and scores[0] <= before.verified.best.score
    nll = configurations_nll(model, calib, [c.removed for c in after.verified.candidates], batch_size=3)
    assert info["verification"]["heldout_nll"] == pytest.approx(list(nll), abs=1e-9)  # every state measured
    for cand, e, how in zip(after.verified.candidates, info["verification"]["energies"],
                            info["verification"]["found_by"]):
        assert e == pytest.approx(base.energy(cand.removed), abs=1e-9) and how in ("solver", "re-centred")
    assert "recentre" in methods.get("hybrid").options
    assert before.verified.best.removed in [c.removed for c in after.verified.candidates]  # kept for the judge
    from cboprune.core.ranking import Entry
    from cboprune.engine.experiment import cost_of

    rec = info["recentre"]
    assert rec["configurations"] == 1 + 6 and rec["fit_fraction"] == pytest.approx(calib.split(4)[0].n_tokens
                                                                                  / calib.n_tokens)
    costs = [cost_of(Entry("hybrid+verify", 3, s.verified.best, s.verified, 0.0), 6, fit_tokens=calib.n_tokens,
                     heldout_tokens=calib.n_tokens) for s in (before, after)]
    assert costs[1] - costs[0] == pytest.approx(7 * rec["fit_fraction"] + rec["verified_states"])


def test_merge_keeps_the_first_pick_and_the_judge_weighs_the_re_centred_pick_against_it():
    from cboprune.engine.judge import judged_states
    from cboprune.selection.verify import merge_verified

    def verified(states, scores, energies):
        cands = [Candidate(removed=s, score=v, rank=r) for r, (s, v) in enumerate(zip(states, scores))]
        return Ranking(method="cbo-hybrid", n_blocks=6, n_remove=2, candidates=cands, info={"verification": {
            "energies": energies, "energy_ranks": list(range(len(states))), "spearman": 0.0}})

    first = verified([(1, 2), (2, 3), (0, 1)], [3.0, 3.1, 3.2], [0.1, 0.2, 0.3])
    second = verified([(3, 4), (4, 5), (2, 3)], [2.0, 2.5, 3.1], [0.9, 0.8, 0.2])
    merged = merge_verified(first, second, 3)
    assert [c.removed for c in merged.candidates] == [(3, 4), (4, 5), (1, 2)]  # first's pick kept, last
    assert [c.score for c in merged.candidates] == [2.0, 2.5, 3.0]
    v = merged.info["verification"]
    assert v["found_by"] == ["re-centred", "re-centred", "solver"] and v["energy_ranks"] == [None, None, 0]
    assert v["energies"] == [0.9, 0.8, 0.1]
    assert [c.removed for c in merge_verified(first, second, 1).candidates] == [(3, 4)]
    merged.info["recentre"] = {"path": [[1, 2], [3, 4]]}
    assert [c.removed for c in judged_states(merged, 2)] == [(3, 4), (1, 2)]  # not the runner-up (4, 5)
    assert [c.removed for c in judged_states(first, 2)] == [(1, 2), (2, 3)]  # no re-centring: the two best


def test_run_cost_charges_each_contiguous_run_of_removed_blocks(model, calib):
    from itertools import combinations

    from cboprune.selection.energy import contiguous_runs, with_run_cost
    from cboprune.engine.experiment import SelectionContext, select
    from cboprune.selection.verify import verify

    assert [contiguous_runs(s) for s in [(), (3,), (1, 2, 3), (1, 3), (5, 0, 1), (0, 2, 4, 5)]] == [0, 1, 1, 2, 2, 3]
    rng = np.random.default_rng(0)
    A = rng.normal(size=(12, 7))
    base = EnergyModel("m", A.T @ A / 12, rng.normal(size=7))
    charged = with_run_cost(base, 0.3)
    for state in combinations(range(7), 3):  # the quadratic form is the energy plus 0.3 per gap, exactly
        assert charged.energy(state) == pytest.approx(base.energy(state) + 0.3 * contiguous_runs(state), abs=1e-12)

    context = SelectionContext(model, calib, batch_size=3, top=6, options={"single_samples": 4, "run_cost": 0.5})
    ranking = select("hybrid", context, [2])[2]
    energy = context.energy_models["hybrid"]
    d = np.asarray(energy.info["single_delta"])
    assert energy.info["run_cost_nats"] == pytest.approx(0.5 * np.median(d))
    lam = ranking.info["energy_run_cost_nats"]
    verified = verify(model, calib, ranking, batch_size=3)
    nll = configurations_nll(model, calib, [c.removed for c in verified.candidates], batch_size=3)
    for cand, value in zip(verified.candidates, nll):  # the verified score charges the same per gap
        assert cand.score == pytest.approx(value + lam * contiguous_runs(cand.removed), abs=1e-9)
    assert [c.score for c in verified.candidates] == sorted(c.score for c in verified.candidates)
    assert verified.info["verification"]["heldout_nll"] == pytest.approx(list(nll))


def test_study_tables_show_the_measured_nll_not_the_run_cost_score(tiny_checkpoint, shared_data, tmp_path):
    out = tmp_path / "study"
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 3)
    assert main(["-q", "study", "--model", str(tiny_checkpoint), "--data",
                 str(shared_data / "calib" / "alpaca_en_demo.json"), "--n-samples", "6", "--heldout-samples", "4",
                 "--seq-len", "32", "--batch-size", "4", "--remove", "2", "--top", "4", "--energies", "hybrid",
                 "--refine", "hybrid", "--refine-sweeps", "1", "--run-cost", "0.5", "--peers", "sleb",
                 "--heal-candidates", "0", "--tasks", f"file:{text}", "--ppl-limit", "1", "--max-length", "64",
                 "--output-dir", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    by = {e["method"]: e for e in data["entries"]}
    ver = by["hybrid+verify"]["ranking"]["info"]["verification"]
    assert ver["heldout_nll"][0] < by["hybrid+verify"]["ranking"]["candidates"][0]["score"]  # charged: can fail
    raw = {tuple(c["removed"]): v for c, v in zip(by["hybrid+verify"]["ranking"]["candidates"], ver["heldout_nll"])}
    for name in ("hybrid:0", "hybrid+verify", "hybrid+refine"):  # the refined state is measured afresh
        removed = tuple(by[name]["candidate"]["removed"])
        if removed in raw:
            assert by[name]["heldout_nll"] == pytest.approx(raw[removed], abs=1e-6), name
    assert by["hybrid+refine"]["heldout_nll"] is not None


def test_hybrid_only_options_on_another_energy_are_one_line_errors():
    from cboprune.core.config import Config
    from cboprune.core.errors import CBOPruneError

    for option, value in (("recentre", 1), ("run_cost", 0.5)):
        with pytest.raises(CBOPruneError, match="option of the hybrid energy, not of 'fisher'"):
            Config.from_sources(None, {"energy": "fisher", option: value, "remove": [2]}, command="run")
    assert Config.from_sources(None, {"energy": "hybrid", "recentre": 0, "remove": [2]}, command="run").recentre == 0
