"""The result type shared by every block-selection method.

CBO solvers, heuristics and peer criteria (Block Influence, SLEB, ...) all return a `Ranking`: an
ordered list of removal configurations with a score each (lower is better) and provenance. The
report, surgery and evaluation consume only this type, so they never special-case a method.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cboprune.core.errors import CBOPruneError


@dataclass(frozen=True)
class Candidate:
    """One block-removal configuration.

    removed: sorted indices of the removed blocks (0-based, in the original model).
    score: the method's objective, lower is better (for CBO: the energy xᵀHx [+ cᵀx]).
    rank: 0-based position in its ranking ("CBO:17" in the paper is rank 17).
    """

    removed: tuple[int, ...]
    score: float
    rank: int
    # Blocks merged rather than dropped (sliding-window merging): tuples of original indices, each
    # merged into its first element. Empty for pure removal.
    merged: tuple[tuple[int, ...], ...] = ()
    tied_with_previous: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "removed": list(self.removed),
            "score": self.score,
            "merged": [list(g) for g in self.merged],
            "tied_with_previous": self.tied_with_previous,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        return cls(
            removed=tuple(int(i) for i in d["removed"]),
            score=float(d["score"]),
            rank=int(d["rank"]),
            merged=tuple(tuple(int(i) for i in g) for g in d.get("merged", ())),
            tied_with_previous=bool(d.get("tied_with_previous", False)),
        )


@dataclass
class Ranking:
    """An ordered list of candidates for removing `n_remove` of `n_blocks` blocks.

    exact: True when `candidates` are provably the K best states of the objective, in order.
    lower_bound: a certified lower bound on the objective of any state not listed (anytime mode);
        None when not computed. The optimality gap is `candidates[-1].score - lower_bound`.
    info: method-specific provenance (solver statistics, criterion parameters, timings).
    """

    method: str
    n_blocks: int
    n_remove: int
    candidates: list[Candidate]
    exact: bool = False
    lower_bound: float | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.candidates)

    def __getitem__(self, i: int) -> Candidate:
        return self.candidates[i]

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["candidates"] = [c.to_dict() for c in self.candidates]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ranking:
        return cls(
            method=d["method"],
            n_blocks=int(d["n_blocks"]),
            n_remove=int(d["n_remove"]),
            candidates=[Candidate.from_dict(c) for c in d["candidates"]],
            exact=bool(d.get("exact", False)),
            lower_bound=d.get("lower_bound"),
            info=dict(d.get("info", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def check_n_remove(n_remove: int, n_blocks: int, n_fixed: int = 0, *, leave: int = 1) -> None:
    """The one check that M is valid: M >= 1, at least `leave` blocks stay, and M fits in the blocks
    not held by `keep` (n_fixed of them)."""

    limit = min(n_blocks - leave, n_blocks - n_fixed)
    if isinstance(n_remove, bool) or not isinstance(n_remove, int) or not 1 <= n_remove <= limit:
        raise CBOPruneError(f"cannot remove M = {n_remove} of N = {n_blocks} blocks"
                            + (f" with {n_fixed} blocks kept" if n_fixed else "")
                            + f": choose 1 <= M <= {limit}")


def prefix_ranking(ranking: Ranking, m: int, score: float) -> Ranking:
    """The ranking of a prefix-consistent greedy method (bi-iter, sleb) for a smaller M: the first M
    removals of its order."""
    info = dict(ranking.info)
    for key in ("order", "order_shrunk", "step_scores", "step_ppl", "step_block_scores"):
        if key in info:
            info[key] = info[key][:m]
    cand = Candidate(removed=tuple(sorted(info["order"])), score=score, rank=0)
    return Ranking(method=ranking.method, n_blocks=ranking.n_blocks, n_remove=m, candidates=[cand], info=info)


@dataclass
class Entry:
    """One row of a comparison: a method's configuration at one M and its evaluation.

    method: "fisher:0", "measured+verify", "cbo:1", "bi-iter", ...; nll: the mean NLL on the set the
    front end judges by (compare: the calibration samples; study: the held-out samples)."""

    method: str
    n_remove: int
    candidate: Candidate
    ranking: Ranking
    selection_seconds: float
    nll: float | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    same_as: str | None = None
    healed: dict[int, dict[str, Any]] = field(default_factory=dict)  # steps -> nll, eval, heal CE after healing
    cost: float | None = None  # selection cost in forward passes of the fitting set
    speedup: dict[str, Any] | None = None  # parameters removed, measured prefill / decode speed-up
    repaired: dict[str, Any] | None = None  # --repair: nll, eval, seconds of the repaired configuration
    repair_healed: dict[int, dict[str, Any]] = field(default_factory=dict)  # like healed, from the repaired model

    @property
    def base(self) -> str:
        return self.method.split(":")[0].split("+")[0]


def found_by(verification: dict[str, Any], i: int) -> str:
    """How the i-th state of a verified ranking was found: "solver" (the energy's own K lowest states),
    "re-centred" (hybrid's re-centring) or "swap search" (refinement); older rankings without the
    list tell the solver's states by their energy rank."""
    listed = verification.get("found_by")
    if listed is not None:
        return listed[i]
    return "solver" if verification["energy_ranks"][i] is not None else "swap search"


def contiguous_runs(removed: Sequence[int]) -> int:
    """How many maximal runs of consecutive block indices `removed` forms (the gaps the kept model has)."""
    ordered = sorted(set(int(i) for i in removed))
    return sum(1 for a, b in zip([None] + ordered, ordered) if a is None or b != a + 1)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN with fewer than 3 points or no spread."""
    from scipy.stats import spearmanr

    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)
