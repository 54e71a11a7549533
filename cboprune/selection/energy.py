"""Energy models: quadratic predictions of the loss increase when a set of blocks is removed.

Every model has the form  E(x) = xᵀQx + cᵀx  over the removal indicator x (x_i = 1: block i
removed), so every solver in `cboprune.solvers` lists its K lowest states under sum(x) = M.

    name           Q, c                                                   cost
    fisher         AᵀA/m, 0 (the paper's model, kept faithfully; with       one gate-gradient pass
                   --variant centered/exact, that matrix instead)
    fisher-linear  ½ AᵀA/m, −ḡ: the second-order Taylor expansion of       the same pass
                   L(α = 1 − x) with the empirical Fisher as Hessian
    exact          ½ H, −ḡ with H the exact gate Hessian (N HVPs)        the pass + N HVPs per batch
    measured       c_i = L(−i) − L₀,  Q_ij = ½ (L(−i,−j) − L(−i) − L(−j) + L₀)   N + P(P−1)/2 forward
                   from measured calibration losses: exact on every      configurations (P: pool)
                   single and pair removal, interactions beyond pairs
                   neglected
    relinearized   fisher-linear, re-expanded at the current point after  ceil(M / step) passes
                   every `step` removals (the path is shared by all M)

ḡ is the mean per-sample gate gradient (`HessianResult.grad_mean`). The paper expands around
α = 1 but takes a step of size 1, and drops the first-order term; `fisher-linear`, `exact`,
`measured` and `relinearized` each repair one part of that approximation. Which one predicts the
real loss best is measured by `cboprune study` (docs/study.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cboprune.core.errors import CBOPruneError
from cboprune.selection.hessian import compute_hessian
from cboprune.models.masked import configurations_nll, n_blocks
from cboprune.core.methods import PAPER, RECOMMENDED, Recommendation  # noqa: F401 (their old home)
from cboprune.core.ranking import Ranking, contiguous_runs, spearman  # noqa: F401 (also their old home)
from cboprune.solvers.api import solve

if TYPE_CHECKING:
    import torch

    from cboprune.data.calibration import CalibrationSet
    from cboprune.selection.hessian import HessianResult

log = logging.getLogger(__name__)

#: the models that need only the gate-gradient pass at alpha = 1
HESSIAN_MODELS = ("fisher", "fisher-linear", "exact")




@dataclass
class EnergyModel:
    """E(x) = xᵀQx + cᵀx; `removable` restricts the blocks a state may remove (None: all)."""

    name: str
    Q: np.ndarray
    linear: np.ndarray
    removable: list[int] | None = None
    force_remove: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return self.Q.shape[0]

    def energy(self, removed: Sequence[int]) -> float:
        x = np.zeros(self.n_blocks)
        x[list(removed)] = 1.0
        return float(x @ self.Q @ x + self.linear @ x)

    def rank(self, n_remove: int, k: int, *, keep: Sequence[int] = (), removable: Sequence[int] | None = None,
             method: str = "auto", time_limit: float | None = None, node_limit: int | None = None,
             seed: int = 0) -> Ranking:
        """The K lowest states with M = n_remove removed blocks (`removable` intersects the model's own)."""

        allowed = self.removable
        if removable is not None:
            allowed = sorted(set(removable) if allowed is None else set(removable) & set(allowed))
        if allowed is not None:
            allowed = sorted(set(allowed) | set(self.force_remove))
            if len(allowed) < n_remove:
                raise CBOPruneError(f"energy model {self.name!r} can remove only {len(allowed)} blocks "
                                    f"({allowed}), fewer than M = {n_remove}: enlarge its pool")
        try:
            ranking = solve(self.Q, n_remove, k, linear=self.linear, keep=keep, force_remove=self.force_remove,
                            removable=allowed, method=method, time_limit=time_limit, node_limit=node_limit,
                            seed=seed)
        except ValueError as exc:  # the solver validates constraints against M
            raise CBOPruneError(f"cannot solve {self.name!r} for M = {n_remove}: {exc}") from None
        if self.name != "fisher":  # "cbo" alone stays the paper's method
            ranking.method = f"cbo-{self.name}"
        ranking.info["energy_model"] = self.name
        ranking.info.update({f"energy_{k}": v for k, v in self.info.items()})
        return ranking


def with_run_cost(model: EnergyModel, cost: float) -> EnergyModel:
    """`model` plus `cost` per contiguous run of removed blocks. runs(x) = Σ x_i − Σ x_i x_{i+1}, so in
    Ising terms a field +cost on every block and a ferromagnetic coupling −cost between neighbours:
    still one quadratic model, solved exactly by the same solvers."""
    Q, linear = model.Q.copy(), model.linear + cost
    for i in range(model.n_blocks - 1):
        Q[i, i + 1] -= cost / 2
        Q[i + 1, i] -= cost / 2
    return EnergyModel(model.name, Q, linear, removable=model.removable, force_remove=model.force_remove,
                       info={**model.info, "run_cost_nats": cost})


def from_hessian(hessian: HessianResult, name: str) -> EnergyModel:
    """`fisher`, `fisher-linear` or `exact` (the last needs a Hessian computed with variant "exact")."""
    if name == "fisher":  # the paper's form xᵀHx with the file's own matrix (AᵀA/m unless another --variant)
        return EnergyModel(name, hessian.H, np.zeros(hessian.n_blocks),
                           info={"hessian": hessian.fingerprint, "variant": hessian.variant})
    if name in ("fisher-linear", "exact"):
        H = hessian.matrix("fisher" if name == "fisher-linear" else "exact")
        return EnergyModel(name, 0.5 * H, -hessian.grad_mean, info={"hessian": hessian.fingerprint})
    raise CBOPruneError(f"energy model {name!r} is not built from one Hessian: use one of {', '.join(HESSIAN_MODELS)}")


# ----------------------------------------------------------------------------- measured interactions

@dataclass
class MeasuredLosses:
    """Calibration NLL of the full model, of every single removal and of the pairs within `pool`."""

    base: float
    single: np.ndarray  # [N]
    pair: np.ndarray  # [N, N], NaN outside the pool and on the diagonal
    pool: list[int]
    seconds: float = 0.0
    configurations: int = 0

    def energy_model(self) -> EnergyModel:
        n = len(self.single)
        d = self.single - self.base
        Q = np.zeros((n, n))
        p = self.pool
        for a in p:
            for b in p:
                if a != b:
                    Q[a, b] = 0.5 * (self.pair[a, b] - self.single[a] - self.single[b] + self.base)
        return EnergyModel("measured", Q, d, removable=None if len(p) == n else sorted(p),
                           info={"pool": sorted(p), "base_nll": self.base, "configurations": self.configurations,
                                 "seconds": round(self.seconds, 2)})


def measure_losses(model: torch.nn.Module, calibration: CalibrationSet, *, pool_size: int | None = None,
                   keep: Sequence[int] = (), removable: Sequence[int] | None = None, batch_size: int = 8,
                   rows_per_pass: int | None = None) -> MeasuredLosses:
    """Single removals of every block, then all pairs among the `pool_size` blocks whose single removal
    costs least (default: every removable block not kept), several configurations per forward pass."""

    start = time.perf_counter()
    n = n_blocks(model)
    kw = {"batch_size": batch_size, "rows_per_pass": rows_per_pass}
    base, *single = configurations_nll(model, calibration, [()] + [(i,) for i in range(n)], **kw)
    single = np.asarray(single)
    allowed = set(range(n) if removable is None else removable) - set(keep)
    candidates = [int(i) for i in np.argsort(single, kind="stable") if int(i) in allowed]
    pool = sorted(int(i) for i in candidates[: pool_size or n])
    pairs = [(a, b) for ai, a in enumerate(pool) for b in pool[ai + 1:]]
    pair = np.full((n, n), np.nan)
    if pairs:
        values = configurations_nll(model, calibration, pairs, **kw)
        for (a, b), v in zip(pairs, values):
            pair[a, b] = pair[b, a] = v
    seconds = time.perf_counter() - start
    log.info("measured %d single and %d pair removals in %.1f s", n, len(pairs), seconds)
    return MeasuredLosses(float(base), single, pair, pool, seconds, 1 + n + len(pairs))


# ----------------------------------------------------------------------------- re-linearization

def relinearized_rankings(model: torch.nn.Module, calibration: CalibrationSet, remove: Sequence[int], k: int, *,
                          step: int = 4, first: HessianResult | None = None, batch_size: int = 8,
                          keep: Sequence[int] = (), removable: Sequence[int] | None = None,
                          progress: bool = False, **solve_options: Any) -> dict[int, Ranking]:
    """Remove `step` blocks at a time by the fisher-linear model expanded at the current point, then
    recompute the gate gradients with those blocks off, until the largest M. The ranking for each M
    lists the K lowest states of the last expansion with the blocks removed before it held fixed.
    `first` reuses a Hessian already computed at alpha = 1."""

    if step < 1:
        raise CBOPruneError(f"the re-linearization step must be >= 1 block, got {step}")
    targets = sorted(set(int(m) for m in remove))
    removed: tuple[int, ...] = ()
    hessian = first
    expansions = []
    out: dict[int, Ranking] = {}
    while True:
        if hessian is None:
            hessian = compute_hessian(model, calibration, batch_size=batch_size, progress=progress,
                                      at_removed=removed)
        local = from_hessian(hessian, "fisher-linear")
        local = EnergyModel("relinearized", local.Q, local.linear, force_remove=removed,
                            info={"step": step, "expansion_points": expansions + [list(removed)]})
        expansions.append(list(removed))
        reach = min(len(removed) + step, targets[-1])
        for m in targets:
            if len(removed) < m <= reach:
                out[m] = local.rank(m, k, keep=keep, removable=removable, **solve_options)
        if reach >= targets[-1]:
            return out
        removed = local.rank(reach, 1, keep=keep, removable=removable, **solve_options).best.removed
        hessian = None
        log.info("re-linearization: expanding again with blocks %s removed", list(removed))


def solve_rankings(hessian: HessianResult, remove: Sequence[int], top: int, *, keep: Sequence[int] = (),
                   method: str = "auto", time_limit: float | None = None, node_limit: int | None = None,
                   seed: int = 0, removable: Sequence[int] | None = None, energy: str = "fisher") -> list[Ranking]:
    """The `top` lowest states for each M in `remove` of a Hessian-based energy model (time_limit per M).

    energy: "fisher" (the paper's xᵀHx with the Hessian's own variant), "fisher-linear" or "exact"
    (see `cboprune.selection.energy`). removable: the only blocks that may be removed (e.g. those of one kind,
    see `removable_blocks`); None: every block not in `keep`."""

    n = hessian.n_blocks
    model_ = from_hessian(hessian, energy)
    rankings = []
    for m in remove:
        if not 0 < m < n:
            raise CBOPruneError(f"M = {m} is impossible for a model with N = {n} blocks: choose 1 <= M <= {n - 1}")
        ranking = model_.rank(m, top, keep=keep, removable=removable, method=method, time_limit=time_limit,
                              node_limit=node_limit, seed=seed)
        ranking.info.setdefault("hessian", hessian.fingerprint)
        if removable is not None:
            ranking.info["removable"] = sorted(int(i) for i in removable)
        rankings.append(ranking)
    return rankings



