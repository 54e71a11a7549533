"""Verification of candidate states by real held-out loss, and structurally diverse candidate sets.

An energy model only predicts the loss. `verify` measures it: every candidate of a ranking is
switched off with gates on held-out calibration samples (several candidates per forward pass,
`configurations_nll`) and the ranking is re-ordered by the measured NLL. The energies stay in
`info` so that the study can report how well they predicted the order (Spearman).

`refine` goes one step further than choosing among the energy model's states: starting from the
verified pick, it tries every swap of one removed block for one kept block on the fitting
samples, takes the best improving swap, and repeats (best-improvement local search on the real
loss). The refined state is kept only if the held-out loss agrees that it is better.

`diverse` thins a long list of low-energy states to ones that differ structurally (Jaccard
similarity of the removed sets at most `max_jaccard`), as the paper suggests for choosing among
excited states: verifying 10 near-copies of the ground state tells little.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from cboprune.data.mix import by_domain, target_tokens
from cboprune.models.masked import calibration_nll, configurations_nll
from cboprune.core.ranking import Candidate, Ranking, contiguous_runs, found_by, spearman

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

    from cboprune.data.calibration import CalibrationSet


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / max(len(sa | sb), 1)


def diverse(ranking: Ranking, n: int, max_jaccard: float = 0.6) -> Ranking:
    """The first `n` candidates (in ranking order) whose removed sets have Jaccard similarity at most
    `max_jaccard` with every candidate already taken; the ground state is always taken."""
    if not 0 <= max_jaccard <= 1:
        raise ValueError(f"max_jaccard must be in [0, 1], got {max_jaccard}")
    taken: list[Candidate] = []
    for cand in ranking.candidates:
        if len(taken) == n:
            break
        if all(jaccard(cand.removed, t.removed) <= max_jaccard for t in taken):
            taken.append(cand)
    info = {**ranking.info, "diverse": {"max_jaccard": max_jaccard, "from": len(ranking.candidates),
                                        "source_ranks": [c.rank for c in taken]}}
    return Ranking(method=ranking.method, n_blocks=ranking.n_blocks, n_remove=ranking.n_remove,
                   candidates=taken, exact=False, lower_bound=ranking.lower_bound, info=info)


def _run_cost(ranking: Ranking) -> float:
    """The charge per contiguous run of removed blocks of the energy that listed `ranking` (nats; 0: none)."""
    return float(ranking.info.get("energy_run_cost_nats") or 0.0)


def charged(states: Sequence[Sequence[int]], nll: Sequence[float], run_cost: float) -> np.ndarray:
    """Measured losses plus the energy's run cost for each state: an energy with a run cost (hybrid
    --run-cost) is verified and refined by the same charge per gap, so re-ranking does not undo it."""
    return np.asarray(nll, dtype=float) + run_cost * np.array([contiguous_runs(s) for s in states], dtype=float)


def measured_nll(verified: Ranking) -> list[float]:
    """The held-out NLL of each candidate of a verified ranking, in its order, without the run cost
    its scores may carry (the number a table of held-out perplexities shows)."""
    raw = (verified.info.get("verification") or {}).get("heldout_nll")
    return list(raw) if raw is not None else [c.score for c in verified.candidates]


def verify(model: torch.nn.Module, heldout: CalibrationSet, ranking: Ranking, *, batch_size: int = 8,
           rows_per_pass: int | None = None, nll: Sequence[float] | None = None) -> Ranking:
    """The ranking's candidates re-ordered by measured held-out NLL (lowest first).

    The result's scores are the held-out NLLs; info["verification"] keeps, in the new order, each
    candidate's energy and its rank in the energy order, and the Spearman correlation between
    energy and held-out NLL over all verified candidates. `nll` passes losses already measured.
    """


    cands = ranking.candidates
    per_domain = None
    parts = by_domain(heldout) if nll is None else None
    if parts:  # a mixed calibration: the same samples, measured per domain, so the worst one is known too
        per_domain = {name: np.asarray(configurations_nll(model, part, [c.removed for c in cands],
                                                          batch_size=batch_size, rows_per_pass=rows_per_pass))
                      for name, part in parts.items()}
        weights = {name: target_tokens(part) for name, part in parts.items()}
        nll = sum(weights[n] * v for n, v in per_domain.items()) / max(sum(weights.values()), 1)
    elif nll is None:
        nll = configurations_nll(model, heldout, [c.removed for c in cands], batch_size=batch_size,
                                 rows_per_pass=rows_per_pass)
    nll = np.asarray(nll, dtype=float)
    run_cost = _run_cost(ranking)
    score = charged([c.removed for c in cands], nll, run_cost)
    order = np.argsort(score, kind="stable")
    new = [replace(cands[i], score=float(score[i]), rank=r, tied_with_previous=False) for r, i in enumerate(order)]
    info = {**ranking.info, "verification": {
        "heldout": heldout.describe(),
        "energies": [cands[i].score for i in order],
        "energy_ranks": [cands[i].rank for i in order],
        "spearman": spearman([c.score for c in cands], nll),
        "score": "held-out calibration NLL" + (f" + {run_cost:.4g} per contiguous run of removed blocks"
                                               if run_cost else ""),
        **({"heldout_nll": [float(nll[i]) for i in order]} if run_cost else {}),
        # mixed calibration: each domain's held-out NLL of every state (in the new order) and the
        # worst domain of each, beside the token-weighted mean that ranks them
        **({"domains": {n: [float(v[i]) for i in order] for n, v in per_domain.items()},
            "worst_domain": [max(per_domain, key=lambda n: per_domain[n][i]) for i in order]}
           if per_domain else {}),
    }}
    return Ranking(method=ranking.method, n_blocks=ranking.n_blocks, n_remove=ranking.n_remove, candidates=new,
                   exact=False, lower_bound=None, info=info)


def refine(model: torch.nn.Module, fit: CalibrationSet, heldout: CalibrationSet, verified: Ranking, *,
           removable: Sequence[int] | None = None, keep: Sequence[int] = (), max_sweeps: int = 8,
           batch_size: int = 8, rows_per_pass: int | None = None) -> Ranking:
    """Swap local search on the real fitting loss from `verified.best` (a ranking from `verify`).

    Each sweep evaluates every state that swaps one removed block for one removable kept block and
    moves to the best one if it lowers the fitting NLL; it stops when no swap helps or after
    `max_sweeps`. The result (one candidate, score = held-out NLL) is the refined state when its
    held-out NLL is lower than the starting state's, else the starting state; info["refine"] holds
    the path, the losses and the number of evaluations.
    """

    n = verified.n_blocks
    allowed = set(range(n) if removable is None else removable) - set(keep)
    kw = {"batch_size": batch_size, "rows_per_pass": rows_per_pass}
    run_cost = _run_cost(verified)  # swaps are compared like the verified scores
    start = tuple(verified.best.removed)
    current = start
    (fit_nll,) = charged([current], configurations_nll(model, fit, [current], **kw), run_cost)
    path, fit_path, evaluations = [list(current)], [float(fit_nll)], 1
    for _ in range(max_sweeps):
        inside = set(current)
        moves = sorted({tuple(sorted(inside - {i} | {j})) for i in inside - set(keep) for j in allowed - inside})
        if not moves:
            break
        nll = charged(moves, configurations_nll(model, fit, moves, **kw), run_cost)
        evaluations += len(moves)
        best = int(np.argmin(nll))
        if not nll[best] < fit_nll:
            break
        current, fit_nll = moves[best], float(nll[best])
        path.append(list(current))
        fit_path.append(fit_nll)
        log.info("refine: swap to %s, fitting NLL %.4f", list(current), fit_nll)
    start_heldout = verified.best.score
    heldout_nll = start_heldout
    if current != start:
        (heldout_nll,) = charged([current], configurations_nll(model, heldout, [current], **kw), run_cost)
        evaluations += 1
    accepted = current != start and heldout_nll < start_heldout
    final = current if accepted else start
    cand = Candidate(removed=tuple(final), score=float(heldout_nll if accepted else start_heldout), rank=0)
    info = {**verified.info, "refine": {"start": list(start), "path": path, "fitting_nll": fit_path,
                                        "start_heldout_nll": start_heldout, "refined_heldout_nll": float(heldout_nll),
                                        "accepted": accepted, "evaluations": evaluations,
                                        "sweeps": len(path) - 1, "max_sweeps": max_sweeps}}
    return Ranking(method=verified.method, n_blocks=n, n_remove=verified.n_remove, candidates=[cand], exact=False,
                   info=info)


def with_refined(verified: Ranking, refined: Ranking, refined_energy: float) -> Ranking:
    """The verified ranking with the refined state first (when refinement was accepted and found a new
    state), ranks renumbered; info["verification"] lists energies aligned with the candidates."""
    state = refined.best
    vinfo = dict(verified.info["verification"])
    cands = list(verified.candidates)
    energies, energy_ranks = list(vinfo["energies"]), list(vinfo["energy_ranks"])
    how_found = [found_by(vinfo, i) for i in range(len(cands))]
    if refined.info["refine"]["accepted"]:
        listed = [i for i, c in enumerate(cands) if c.removed == state.removed]
        e_rank, how = None, "swap search"  # not listed by the solver
        if listed:
            (i,) = listed
            e_rank, refined_energy, how = energy_ranks[i], energies[i], how_found[i]
            del cands[i], energies[i], energy_ranks[i], how_found[i]
        cands.insert(0, state)
        energies.insert(0, refined_energy)
        energy_ranks.insert(0, e_rank)
        how_found.insert(0, how)
    cands = [replace(c, rank=r) for r, c in enumerate(cands)]
    vinfo.update(energies=energies, energy_ranks=energy_ranks, found_by=how_found)
    info = {**verified.info, "verification": vinfo, "refine": refined.info["refine"]}
    return Ranking(method=verified.method, n_blocks=verified.n_blocks, n_remove=verified.n_remove, candidates=cands,
                   exact=False, info=info)


def merge_verified(first: Ranking, second: Ranking, top: int) -> Ranking:
    """Two verified rankings of the same M (e.g. an energy's states and those of a re-centred energy)
    as one: their states once each, ordered by score (held-out NLL plus the run cost both carry), the
    `top` best kept. info["verification"] keeps, per state, its energy under `first`'s model (the
    caller passes `second` with those energies as its pre-verification scores), its rank in `first`'s
    energy order (None: listed only by `second`), its measured NLL and, for a mix, its domains.
    With `top` >= 2, `first`'s best state is always kept (in the last place if it falls out)."""
    def rows(r: Ranking, found_by: str) -> list[dict]:
        v = r.info["verification"]
        nll = measured_nll(r)
        return [{"cand": c, "energy": v["energies"][i], "energy_rank": v["energy_ranks"][i] if r is first else None,
                 "nll": nll[i], "found_by": (v.get("found_by") or [found_by] * len(nll))[i],
                 "domains": {n: d[i] for n, d in v["domains"].items()} if v.get("domains") else None,
                 "worst": v["worst_domain"][i] if v.get("worst_domain") else None}
                for i, c in enumerate(r.candidates)]

    seen: dict[tuple[int, ...], dict] = {}
    for row in rows(first, "solver") + rows(second, "re-centred"):
        seen.setdefault(tuple(row["cand"].removed), row)
    ranked = sorted(seen.values(), key=lambda row: row["cand"].score)
    kept = ranked[:top]
    if top >= 2 and first.best.removed not in {tuple(row["cand"].removed) for row in kept}:
        # `first`'s pick stays listed (last, so the order holds): the judge weighs a new state against it
        kept[-1] = seen[tuple(first.best.removed)]
    vinfo = {**first.info["verification"],
             "energies": [row["energy"] for row in kept], "energy_ranks": [row["energy_rank"] for row in kept],
             "found_by": [row["found_by"] for row in kept],
             "spearman": spearman([row["energy"] for row in seen.values()], [row["nll"] for row in seen.values()])}
    if "heldout_nll" in vinfo:
        vinfo["heldout_nll"] = [float(row["nll"]) for row in kept]
    if vinfo.get("domains"):
        vinfo["domains"] = {n: [row["domains"][n] for row in kept] for n in vinfo["domains"]}
        vinfo["worst_domain"] = [row["worst"] for row in kept]
    cands = [replace(row["cand"], rank=r, tied_with_previous=False) for r, row in enumerate(kept)]
    return Ranking(method=first.method, n_blocks=first.n_blocks, n_remove=first.n_remove, candidates=cands,
                   exact=False, lower_bound=None, info={**first.info, "verification": vinfo})


def domain_losses(model, calibration, *, batch_size: int = 8, removed=()) -> dict[str, float] | None:
    """Token-weighted mean NLL (as `calibration_nll`) on each domain of a mixed calibration set, with
    `removed` switched off (None when it is not a mix): the verification's one number taken apart,
    so that a report can show the worst domain beside the mean."""
    parts = by_domain(calibration)
    if parts is None:
        return None
    return {name: calibration_nll(model, part, batch_size=batch_size, removed=removed) for name, part in parts.items()}

