"""Input validation, reduction to the free variables, and the final (canonical) ranking.

Every solver goes through the same three steps:

1. `make_problem` validates (H, M, K, c, keep, force_remove, removable) and folds the constraints
   in: kept blocks disappear, forced-removed blocks become a constant plus a linear term, so the
   kernels only see the free variables with `m = M - |force_remove|` of them to remove.
2. a kernel returns bit masks over the free variables,
3. `finalize` maps them back to block indices, recomputes every energy *canonically* from the
   original H (so all methods report bit-identical scores for the same state), sorts, marks ties
   and builds the shared `Ranking`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cboprune.core.ranking import Candidate, Ranking

logger = logging.getLogger(__name__)

#: Method name written into every `Ranking` produced here.
RANKING_METHOD = "cbo"


@dataclass
class Problem:
    """A validated CBO instance and its reduction to the free variables.

    H: (N, N) symmetric matrix; c: (N,) linear term; n_blocks N; n_remove M.
    free: (n,) sorted original indices of the free variables; forced: sorted forced-removed indices.
    W: (n, n) off-diagonal part of H on the free set (zero diagonal).
    u: (n,) unary costs H_jj + c_j + 2 sum_{f in forced} H_jf.
    m: number of free variables to remove; const: energy of the forced-removed set alone.
    scale: energy scale M * max_i (|H_ii| + |c_i|) used for relative tolerances.
    """

    H: np.ndarray
    c: np.ndarray
    n_blocks: int
    n_remove: int
    k: int
    free: np.ndarray
    forced: tuple[int, ...]
    W: np.ndarray
    u: np.ndarray
    m: int
    const: float
    scale: float
    has_linear: bool
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def n_free(self) -> int:
        return int(self.free.shape[0])

    @property
    def n_feasible(self) -> int:
        return math.comb(self.n_free, self.m)

    @property
    def words(self) -> int:
        return max(1, (self.n_free + 63) // 64)


def _index_set(name: str, values: Iterable[int] | None, n: int) -> set[int]:
    if values is None:
        return set()
    out: set[int] = set()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"{name} must contain integer block indices, got {v!r}")
        iv = int(v)
        if not 0 <= iv < n:
            raise ValueError(f"{name} contains block index {iv}, outside 0..{n - 1}")
        out.add(iv)
    return out


def make_problem(
    H: Any,
    n_remove: int,
    k: int = 1,
    *,
    linear: Any = None,
    keep: Iterable[int] = (),
    force_remove: Iterable[int] = (),
    removable: Iterable[int] | None = None,
    sym_rtol: float = 1e-8,
) -> Problem:
    """Validate the inputs and reduce the problem to its free variables.

    Parameters
    ----------
    H : array_like, shape (N, N)
        Symmetric (PSD in CBO; only the relaxation bound uses convexity) energy matrix.
    n_remove : int
        M, the number of blocks to remove in total (forced ones included).
    k : int
        Number of lowest states wanted (>= 1).
    linear : array_like, shape (N,), optional
        Linear term c of the energy x^T H x + c^T x.
    keep, force_remove : iterable of int
        Blocks that must stay / must be removed.
    removable : iterable of int, optional
        If given, only these blocks may be removed (the others are kept).

    Raises
    ------
    ValueError
        On any invalid input, with a message that says what is wrong.
    """
    try:
        Hm = np.array(H, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"H must be a real square matrix: {exc}") from None
    if Hm.ndim != 2 or Hm.shape[0] != Hm.shape[1]:
        raise ValueError(f"H must be a square (N, N) matrix, got shape {Hm.shape}")
    n_blocks = int(Hm.shape[0])
    if n_blocks == 0:
        raise ValueError("H is empty (N = 0)")
    if not np.all(np.isfinite(Hm)):
        raise ValueError("H contains NaN or infinite entries")
    amax = float(np.max(np.abs(Hm))) if Hm.size else 0.0
    asym = float(np.max(np.abs(Hm - Hm.T)))
    if asym > sym_rtol * max(amax, np.finfo(float).tiny):
        raise ValueError(
            f"H must be symmetric: max |H - H^T| = {asym:.3g} (max |H| = {amax:.3g}); "
            "symmetrize it with (H + H.T) / 2 if the asymmetry is rounding noise"
        )
    Hm = 0.5 * (Hm + Hm.T)
    if linear is None:
        c = np.zeros(n_blocks)
        has_linear = False
    else:
        c = np.array(linear, dtype=np.float64).reshape(-1)
        if c.shape != (n_blocks,):
            raise ValueError(f"linear must have shape ({n_blocks},), got {np.shape(linear)}")
        if not np.all(np.isfinite(c)):
            raise ValueError("linear contains NaN or infinite entries")
        has_linear = bool(np.any(c != 0))
    if isinstance(n_remove, bool) or not isinstance(n_remove, int | np.integer):
        raise ValueError(f"n_remove must be an integer, got {n_remove!r}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"k must be an integer, got {k!r}")
    n_remove = int(n_remove)
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    keep_s = _index_set("keep", keep, n_blocks)
    force_s = _index_set("force_remove", force_remove, n_blocks)
    both = keep_s & force_s
    if both:
        raise ValueError(f"blocks {sorted(both)} are both in keep and force_remove")
    if removable is not None:
        rem_s = _index_set("removable", removable, n_blocks)
        bad = force_s - rem_s
        if bad:
            raise ValueError(f"blocks {sorted(bad)} are in force_remove but not in removable")
        keep_s |= set(range(n_blocks)) - rem_s
    free = np.array(sorted(set(range(n_blocks)) - keep_s - force_s), dtype=np.int64)
    forced = tuple(sorted(force_s))
    lo, hi = len(forced), len(forced) + free.shape[0]
    if not lo <= n_remove <= hi:
        raise ValueError(
            f"cannot remove {n_remove} of {n_blocks} blocks: with {len(forced)} forced removals and "
            f"{free.shape[0]} free blocks, n_remove must be between {lo} and {hi}"
        )
    m = n_remove - len(forced)
    fidx = np.array(forced, dtype=np.int64)
    Hff = Hm[np.ix_(free, free)]
    W = Hff.copy()
    np.fill_diagonal(W, 0.0)
    u = np.diag(Hff).copy() + c[free]
    if fidx.size:
        u += 2.0 * Hm[np.ix_(free, fidx)].sum(axis=1)
        const = float(Hm[np.ix_(fidx, fidx)].sum() + c[fidx].sum())
    else:
        const = 0.0
    scale = max(n_remove, 1) * float(np.max(np.abs(np.diag(Hm)) + np.abs(c)))
    if scale <= 0.0:
        scale = max(amax, 1.0)
    return Problem(
        H=Hm, c=c, n_blocks=n_blocks, n_remove=n_remove, k=k, free=free, forced=forced,
        W=np.ascontiguousarray(W), u=np.ascontiguousarray(u), m=m, const=const, scale=scale,
        has_linear=has_linear,
    )


def energy(H: np.ndarray, removed: Iterable[int], linear: np.ndarray | None = None) -> float:
    """Canonical energy x^T H x + c^T x of a removal set (float64, fixed summation order).

    Parameters
    ----------
    H : (N, N) array
    removed : indices i with x_i = 1
    linear : (N,) array, optional
    """
    idx = np.array(sorted(int(i) for i in removed), dtype=np.int64)
    if idx.size == 0:
        return 0.0
    e = float(np.sum(H[np.ix_(idx, idx)]))
    if linear is not None:
        e += float(np.sum(np.asarray(linear)[idx]))
    return e


def masks_to_free_sets(masks: np.ndarray, n_free: int) -> list[tuple[int, ...]]:
    """Decode (K, words) uint64 masks into sorted tuples of free-variable positions."""
    out = []
    for row in np.asarray(masks, dtype=np.uint64):
        bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:n_free]
        out.append(tuple(int(i) for i in np.flatnonzero(bits)))
    return out


def free_sets_to_removed(p: Problem, sets: Iterable[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Map free-variable positions back to sorted original block indices (forced ones added)."""
    out = []
    for s in sets:
        out.append(tuple(sorted([int(p.free[i]) for i in s] + list(p.forced))))
    return out


def finalize(
    p: Problem,
    removed_sets: Iterable[tuple[int, ...]],
    *,
    tie_tol: float,
    exact: bool,
    lower_bound: float | None,
    info: dict[str, Any],
) -> Ranking:
    """Canonical energies, deterministic order, tie marks, truncation to K, `Ranking`.

    Energies are recomputed from the original H with `energy` so that every method scores a state
    identically. States are sorted by energy; consecutive energies within `tie_tol * scale` form a
    tie group, listed in lexicographic order of the removed indices, each member after the first
    marked `tied_with_previous`.
    """
    uniq = sorted(set(tuple(s) for s in removed_sets))
    scored = [(energy(p.H, s, p.c if p.has_linear else None), s) for s in uniq]
    scored.sort()
    tol = tie_tol * p.scale
    ordered: list[tuple[float, tuple[int, ...], bool]] = []
    i = 0
    while i < len(scored):
        j = i + 1
        while j < len(scored) and scored[j][0] - scored[j - 1][0] <= tol:
            j += 1
        group = sorted(scored[i:j], key=lambda t: t[1])
        for gi, (e, s) in enumerate(group):
            ordered.append((e, s, gi > 0))
        i = j
    ordered = ordered[: p.k]
    cands = [
        Candidate(removed=s, score=float(e), rank=r, tied_with_previous=t)
        for r, (e, s, t) in enumerate(ordered)
    ]
    info = dict(info)
    info.setdefault("tie_tol", tie_tol)
    info["tie_abs"] = tol
    info["energy_scale"] = p.scale
    info["n_feasible"] = p.n_feasible
    info["n_free"] = p.n_free
    info["forced_removed"] = list(p.forced)
    if exact and ordered and lower_bound is None:
        # exact list: every state not listed scores at least the K-th listed one
        lower_bound = ordered[-1][0]
    if ordered and lower_bound is not None:
        kth = ordered[-1][0]
        lb = min(float(lower_bound), kth)
        info["gap"] = max(0.0, kth - lb)
        info["n_certified"] = sum(1 for e, _, _ in ordered if e <= float(lower_bound))
        lower_bound = lb
    elif exact:
        info["gap"] = 0.0
        info["n_certified"] = len(ordered)
    if exact:
        info["gap"] = 0.0
        info["n_certified"] = len(ordered)
    return Ranking(
        method=RANKING_METHOD,
        n_blocks=p.n_blocks,
        n_remove=p.n_remove,
        candidates=cands,
        exact=exact,
        lower_bound=None if lower_bound is None else float(lower_bound),
        info=info,
    )


def new_store(k: int, words: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty top-K store: energies (K,), masks (K, words) uint64, [count, worst] (2,) int64."""
    return np.full(k, np.inf), np.zeros((k, words), np.uint64), np.zeros(2, np.int64)


def store_sets(p: Problem, topE: np.ndarray, topM: np.ndarray, ts: np.ndarray) -> list[tuple[int, ...]]:
    """Removed-block tuples (original indices) of the filled part of a store."""
    cnt = int(ts[0])
    return free_sets_to_removed(p, masks_to_free_sets(topM[:cnt], p.n_free))
