"""The experiment engine behind `compare` and `study` (and the selection step of `run`):

    select with any set of registered methods on one calibration split
      -> dedupe configurations -> evaluate each distinct configuration once -> tables and figures

    SelectionContext      the model, the fitting (and held-out) samples, the constraints, and the
                          passes several methods share (block statistics, single-removal losses,
                          the gate-gradient Hessian), each computed once
    select(name, ctx, M)  any registered method by name (`cboprune.core.methods`) -> {M: Ranking}
    energy_entries(...)   an energy model's states: ground state / ranks, verified pick, refined pick
    peer_entries(...)     a peer criterion's configuration per M
    evaluate_entries(...) every distinct configuration evaluated once with one `EvalProtocol`

Front ends (`cboprune.workflows.compare`, `cboprune.workflows.study`) choose the methods, the split and the tables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cboprune.models import masked
from cboprune.core import methods as registry
from cboprune.models.block_stats import collect_block_stats
from cboprune.bench.measure import speedup_summary
from cboprune.core.errors import CBOPruneError
from cboprune.selection.hessian import compute_hessian
from cboprune.models.masked import n_blocks, single_removal_nll
from cboprune.models.merging import apply_configuration
from cboprune.core.ranking import Entry, check_n_remove
from cboprune.engine.configurations import configuration_fields, configuration_key, merge_rule_of
from cboprune.engine.resume import evaluation_state
from cboprune.selection.verify import diverse as diverse_set
from cboprune.selection.verify import measured_nll, refine, with_refined
from cboprune.selection.verify import verify as verify_ranking

if TYPE_CHECKING:
    import torch

    from cboprune.data.calibration import CalibrationSet
    from cboprune.evaluation.protocol import EvalProtocol
    from cboprune.core.ranking import Ranking
    from cboprune.engine.resume import StepCache

log = logging.getLogger(__name__)


@dataclass
class SelectionContext:
    """Everything a method's `select(context, remove)` may use. `options` holds method settings
    (pool, relin_step, exact_samples, swm_threshold, swm_rule); `cache` the shared passes."""

    model: torch.nn.Module
    fit: CalibrationSet
    heldout: CalibrationSet | None = None
    batch_size: int = 8
    top: int = 1  # K states per M for ranked methods
    keep: tuple[int, ...] = ()
    removable: list[int] | None = None
    seed: int = 0
    solver: str = "auto"
    time_limit: float | None = None
    node_limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    hessian_options: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    progress: bool = False
    cache: dict[str, Any] = field(default_factory=dict)
    energy_models: dict[str, Any] = field(default_factory=dict)  # energy name -> EnergyModel (None: several)

    @property
    def n_blocks(self) -> int:
        return self.cached("n_blocks", lambda: n_blocks(self.model))

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def solve_options(self) -> dict[str, Any]:
        return {"keep": list(self.keep), "removable": self.removable, "method": self.solver,
                "time_limit": self.time_limit, "node_limit": self.node_limit, "seed": self.seed}

    def block_stats(self):
        return self.cached("block_stats", lambda: collect_block_stats(self.model, self.fit,
                                                                      batch_size=self.batch_size))

    def single_removal_nll(self) -> dict[int, float]:
        return self.cached("single_removal_nll", lambda: single_removal_nll(self.model, self.fit,
                                                                            batch_size=self.batch_size))

    def hessian(self):
        """The gate-gradient pass on the fitting samples (with `hessian_options`)."""

        return self.cached("hessian", lambda: compute_hessian(self.model, self.fit, batch_size=self.batch_size,
                                                              model_name=self.model_name, progress=self.progress,
                                                              **self.hessian_options))

    def exact_hessian(self):
        """The Hessian with the exact gate Hessian (N HVPs): the main one when it is exact, else its own
        pass on the first `exact_samples` fitting samples."""

        main = self.cache.get("hessian")
        if main is not None and main.H_exact is not None:
            return main
        n = self.options.get("exact_samples")
        sub = self.fit if n is None or n >= self.fit.n_samples else self.fit.split(n)[0]
        opts = {**self.hessian_options, "variant": "exact"}
        return self.cached("hessian:exact", lambda: compute_hessian(self.model, sub, batch_size=self.batch_size,
                                                                    model_name=self.model_name,
                                                                    progress=self.progress, **opts))


def select(name: str, context: SelectionContext, remove: Sequence[int]) -> dict[int, Ranking]:
    """Run one registered method for every M (greedy methods run once, to the largest M)."""

    method = registry.get(name)
    remove = sorted({int(m) for m in remove})
    for m in remove:
        check_n_remove(m, context.n_blocks, len(context.keep), leave=method.min_kept)
    return method.select(context, remove)


@dataclass
class EnergyResult:
    entries: list[Entry]
    rankings: dict[int, Ranking]  # the (thinned) energy rankings per M, before verification
    correlations: dict[int, dict[str, Any]]  # M -> spearman, energies, held-out NLL, energy ranks, refined
    seconds: float


@dataclass
class SelectedStates:
    """One M's states of an energy model, through the one verify / refine path that `run`, `compare`
    and `study` share: the listed lowest states, re-ranked by held-out loss, and the swap-refined pick."""

    listed: Ranking
    verified: Ranking | None = None
    refined: Ranking | None = None
    verify_seconds: float = 0.0
    refine_seconds: float = 0.0


def energy_states(name: str, context: SelectionContext, remove: Sequence[int], *, top: int, verify: bool = False,
                  refine_sweeps: int = 0, diverse: float | None = None) -> tuple[dict[int, SelectedStates], float]:
    """The `top` lowest states per M of a registered energy model on `context.fit` ({M: states},
    seconds to list them): verified on `context.heldout` when `verify` or `refine_sweeps`, the verified
    pick swap-refined for `refine_sweeps` sweeps. `diverse`: thin the list to states with Jaccard
    similarity at most this (from 5 x top states)."""
    method = registry.get(name)
    if method.kind != registry.ENERGY:
        raise CBOPruneError(f"{name!r} is a peer criterion, not an energy model: use `cboprune compare`")
    if (verify or refine_sweeps) and context.heldout is None:
        raise CBOPruneError("verification needs held-out calibration samples: set heldout_samples >= 1")
    t0 = time.perf_counter()
    context.top = top * 5 if diverse is not None else top
    by_m = select(name, context, remove)
    build = time.perf_counter() - t0
    out: dict[int, SelectedStates] = {}
    for m in sorted(by_m):
        states = SelectedStates(diverse_set(by_m[m], top, diverse) if diverse is not None else by_m[m])
        if verify or refine_sweeps:
            t1 = time.perf_counter()
            states.verified = verify_ranking(context.model, context.heldout, states.listed,
                                             batch_size=context.batch_size)
            if method.after_verify is not None:  # the model's own search from its verified pick
                states.verified = method.after_verify(context, states.verified)
            states.verify_seconds = time.perf_counter() - t1
        if refine_sweeps:
            t2 = time.perf_counter()
            states.refined = refine(context.model, context.fit, context.heldout, states.verified,
                                    removable=context.removable, keep=context.keep, max_sweeps=refine_sweeps,
                                    batch_size=context.batch_size)
            states.refine_seconds = time.perf_counter() - t2
        out[m] = states
    return out, build


def rank_states(context: SelectionContext, remove: Sequence[int], top: int, *, energy: str, verify: bool,
                refine_sweeps: int) -> list[Ranking]:
    """`run`'s rankings: the `top` best states per M of an energy model (`energy_states`), verified
    when asked, with the swap-refined state first when `refine_sweeps` (docs/study.md)."""
    by_m, _ = energy_states(energy, context, remove, top=top, verify=verify, refine_sweeps=refine_sweeps)
    hessian = context.cache.get("hessian")
    rankings = []
    for m, states in by_m.items():
        ranking = states.verified or states.listed
        for r in {id(states.listed): states.listed, id(ranking): ranking}.values():
            if hessian is not None:
                r.info.setdefault("hessian", hessian.fingerprint)
            if context.removable is not None:
                r.info["removable"] = sorted(int(i) for i in context.removable)
        if states.refined is not None:
            model = context.energy_models.get(energy)
            ranking = with_refined(ranking, states.refined, model.energy(states.refined.best.removed)
                                   if model is not None else float("nan"))
        rankings.append(ranking)
    return rankings


def energy_entries(name: str, context: SelectionContext, remove: Sequence[int], *, ranks: Sequence[int] = (0,),
                   verify: bool = False, refine_sweeps: int = 0, diverse: float | None = None,
                   k: int | None = None, alias: str | None = None) -> EnergyResult:
    """The states of one energy model: entries `<alias>:<rank>` for `ranks`, `+verify` (the best of
    the K states on the held-out samples) and `+refine` (swap search from it) when asked.
    `diverse`: thin the list to states with Jaccard similarity at most this (from 5K states)."""
    alias = alias or name
    t0 = time.perf_counter()
    by_m, build = energy_states(name, context, remove, top=k or context.top, verify=verify,
                                refine_sweeps=refine_sweeps if verify else 0, diverse=diverse)
    result = EnergyResult([], {}, {}, 0.0)
    for m, states in by_m.items():
        ranking = states.listed
        result.rankings[m] = ranking
        if states.verified is None:
            result.entries += [Entry(f"{alias}:{r}", m, ranking.candidates[r], ranking, round(build, 2))
                               for r in ranks if r < len(ranking.candidates)]
            continue
        verified = states.verified
        vinfo = verified.info["verification"]
        # Tables show the measured held-out NLL; a run cost (hybrid) only orders the states.
        nll = measured_nll(verified)
        result.correlations[m] = {"spearman": vinfo["spearman"], "energies": vinfo["energies"],
                                  "heldout_nll": nll, "energy_ranks": vinfo["energy_ranks"]}
        by_removed = {c.removed: v for c, v in zip(verified.candidates, nll)}
        seconds = round(build + states.verify_seconds, 2)
        result.entries.append(Entry(f"{alias}:0", m, ranking.best, ranking, round(build, 2),
                                    nll=by_removed.get(ranking.best.removed)))
        result.entries.append(Entry(f"{alias}+verify", m, verified.best, verified, seconds, nll=nll[0]))
        ground = by_removed.get(ranking.best.removed)
        log.info("%s M = %d: ground state %s held-out NLL %s; verified pick %s (energy rank %s) %.4f; Spearman %.2f",
                 name, m, list(ranking.best.removed), "(not among the best K)" if ground is None else f"{ground:.4f}",
                 list(verified.best.removed), vinfo["energy_ranks"][0], nll[0], vinfo["spearman"])
        if states.refined is not None:
            refined = states.refined
            charged = vinfo.get("heldout_nll") is not None  # a run cost in the score: measure the raw NLL later
            result.entries.append(Entry(f"{alias}+refine", m, refined.best, refined,
                                        round(seconds + states.refine_seconds, 2),
                                        nll=None if charged else refined.best.score))
            model = context.energy_models.get(name)
            result.correlations[m]["refined"] = {
                "removed": list(refined.best.removed), "heldout_nll": refined.best.score,
                "energy": model.energy(refined.best.removed) if model is not None else None}
    result.seconds = time.perf_counter() - t0
    return result


def cost_of(entry: Entry, n_blocks: int, *, fit_tokens: int, heldout_tokens: int = 0,
            options: dict[str, Any] | None = None) -> float:
    """Selection cost in forward passes of the fitting set (tokens processed / fitting tokens): the
    method's cost model plus, for `+verify`, the K held-out evaluations (and hybrid's re-centring: its
    flips and the states it verified), for `+refine`, the swap
    search's evaluations and, for `+judge`, the verification and the judge's heals (measured, from
    the ranking's info)."""

    cost = registry.get(entry.base).cost(n_blocks, entry.n_remove, **(options or {}))
    ratio = heldout_tokens / max(fit_tokens, 1)
    ver = entry.ranking.info.get("verification")
    rec = entry.ranking.info.get("recentre")  # hybrid's re-centring: its flips and the new states it verified
    if any(s in entry.method for s in ("+verify", "+refine", "+judge")) and ver:
        cost += len(ver["energies"]) * ratio
        if rec:
            cost += rec["configurations"] * rec["fit_fraction"] + rec["verified_states"] * ratio
    judge = entry.ranking.info.get("heal_judge")
    if "+judge" in entry.method and judge:
        cost += judge["forward_passes"]
    ref = entry.ranking.info.get("refine")
    if "+refine" in entry.method and ref:
        cost += ref["evaluations"] - 1 + ratio  # swaps on the fitting set, the final check held out
    return float(cost)


def peer_entries(name: str, context: SelectionContext, remove: Sequence[int]) -> list[Entry]:
    """A peer criterion's configuration per M (shared passes charged to the first method that needs them)."""
    t0 = time.perf_counter()
    context.top = 1
    by_m = select(name, context, remove)
    seconds = round(time.perf_counter() - t0, 2)
    log.info("%s selected in %.1f s", name, seconds)
    return [Entry(name, m, by_m[m].best, by_m[m], seconds) for m in sorted(by_m)]


def evaluate_entries(entries: Sequence[Entry], model: torch.nn.Module, tokenizer, protocol: EvalProtocol, *,
                     nll_samples: CalibrationSet, batch_size: int = 8, speedup: bool = False,
                     cache: StepCache | None = None, cache_fields: dict[str, Any] | None = None) -> None:
    """Evaluate every distinct configuration once (entries with an equal configuration share the
    result and name the first in `same_as`); an entry's `nll` is measured on `nll_samples` when the
    selection did not already measure it there. `cache` (with `cache_fields`, the weights' fingerprint):
    evaluations finished by an earlier, interrupted run are reused."""

    done: dict[tuple, Entry] = {}
    for entry in entries:
        rule = merge_rule_of(entry)
        key = configuration_key(entry.candidate, rule)
        if key in done:
            first = done[key]
            entry.eval, entry.same_as, entry.speedup = first.eval, first.method, first.speedup
            entry.nll = first.nll if entry.nll is None else entry.nll
            continue
        done[key] = entry
        fields = {**(cache_fields or {}), "step": "evaluation", **configuration_fields(entry.candidate, rule),
                  "eval": protocol.identity(), "nll_samples": nll_samples.fingerprint, "speedup": speedup}
        state = cache.load(fields, lambda v: evaluation_state(v, protocol.task_names)) if cache is not None else None
        if state is not None and (entry.nll is not None or state["nll"] is not None):
            entry.eval, entry.speedup = state["eval"], state.get("speedup")
            entry.nll = state["nll"] if entry.nll is None else entry.nll
            log.info("reused the evaluation of %s at M = %d", entry.method, entry.n_remove)
            continue
        pruned = apply_configuration(model, entry.candidate, rule)
        if entry.nll is None:
            entry.nll = masked.calibration_nll(pruned, nll_samples, batch_size=batch_size)
        entry.eval = protocol.evaluate(pruned, tokenizer)
        if speedup:
            entry.speedup = speedup_summary(model, pruned)
        del pruned
        if cache is not None:  # the NLL on these samples, whichever step measured it
            cache.save(fields, {"nll": entry.nll, "eval": entry.eval, "speedup": entry.speedup})
        log.info("evaluated %s at M = %d: removed %s, NLL %.4f", entry.method, entry.n_remove,
                 list(entry.candidate.removed), entry.nll)


def evaluate_original(model: torch.nn.Module, tokenizer, protocol: EvalProtocol, nll_samples: CalibrationSet,
                      batch_size: int, cache: StepCache | None = None, cache_fields: dict[str, Any] | None = None, *,
                      key: str) -> dict[str, Any]:
    """The unpruned model's evaluation, with its mean NLL on `nll_samples` under `key`."""

    fields = {**(cache_fields or {}), "step": "original", "eval": protocol.identity(),
              "nll_samples": nll_samples.fingerprint}
    state = cache.load(fields, lambda v: evaluation_state(v, protocol.task_names)) if cache is not None else None
    if state is not None and state["nll"] is not None:
        return {**state["eval"], key: state["nll"]}
    evaluation = protocol.evaluate(model, tokenizer)
    nll = masked.calibration_nll(model, nll_samples, batch_size=batch_size)
    if cache is not None:
        cache.save(fields, {"eval": evaluation, "nll": nll})
    return {**evaluation, key: nll}


def entry_dict(entry: Entry, nll_key: str) -> dict[str, Any]:
    """An entry as results.json stores it (`nll_key`: "calib_ppl" stores exp(nll), else the NLL)."""
    import math

    value = (math.exp(entry.nll) if entry.nll is not None else None) if nll_key == "calib_ppl" else entry.nll
    return {"method": entry.method, "n_remove": entry.n_remove, "candidate": entry.candidate.to_dict(),
            "ranking": entry.ranking.to_dict(), "selection_seconds": entry.selection_seconds, nll_key: value,
            "same_as": entry.same_as, "eval": entry.eval, "cost_forward_passes": entry.cost,
            "speedup": entry.speedup,
            "healed": {str(k): v for k, v in entry.healed.items()}, "repaired": entry.repaired,
            "repair_healed": {str(k): v for k, v in entry.repair_healed.items()}}
