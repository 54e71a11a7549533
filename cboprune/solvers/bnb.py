"""Exact K-best branch-and-bound with certified anytime bounds.

Outline (details in docs/solver.md):

1. seed: tabu search returns K distinct low states; its K-th energy is the initial cut-off;
2. relaxation: a diagonal shift s makes Q = W + diag(s) PSD on {sum y = 0}, so
   min y^T Q y + (u - s + 2 g)^T y over {0 <= y <= 1, sum y = r} is a convex lower bound of every
   completion (y_j^2 = y_j on binaries); the shift (none / uniform / diagonal-scaled) with the
   best root bound is used;
3. static variable order by the root relaxation (values near 1 first);
4. compiled depth-first search; at each node the row bound (O(n) with a precomputed table), then
   the relaxation bound (warm-started projected gradient, stopped early either way), prune when
   bound > cut-off + slack;
5. on a time / node budget, stop and certify: every unexplored state lies below an open node of
   the DFS path, whose stored bound is a lower bound; open nodes are re-bounded with a fully
   converged relaxation to tighten the certificate.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg

from cboprune.solvers import _kernels as kn
from cboprune.solvers._problem import Problem, free_sets_to_removed
from cboprune.solvers.exhaustive import new_store, store_sets
from cboprune.solvers.heuristics import run_tabu

logger = logging.getLogger(__name__)


@dataclass
class BnBResult:
    """Raw branch-and-bound output (original block indices, before canonical re-scoring)."""

    sets: list[tuple[int, ...]]
    complete: bool
    open_bound: float  # certified bound on every unexplored state (+inf when complete)
    root_bound: float
    info: dict[str, Any]


def _relaxation_shifts(p: Problem) -> dict[str, np.ndarray]:
    """Candidate diagonal shifts s (n,) with W + diag(s) PSD on the subspace {sum y = 0}.

    "uniform": s = h - mu, mu = lambda_min of H_FF on 1^perp (negative when H is indefinite);
    "scaled": s = h (1 - mu'), mu' the smallest generalized eigenvalue of (H_FF, diag h) on
    1^perp (helps when block scales are uneven). Smaller s gives a tighter bound (the bound is
    concave in s with gradient y^2 - y <= 0), so s = h ("none") is never better than "uniform".
    """
    n = p.n_free
    h = np.diag(p.H)[p.free].copy()
    Hff = p.H[np.ix_(p.free, p.free)]
    if n < 2:
        return {"none": h.copy()}  # y is fixed by sum y = r: any shift is exact
    out: dict[str, np.ndarray] = {}
    # orthonormal basis of 1^perp
    P = scipy.linalg.null_space(np.ones((1, n)))  # (n, n-1)
    A = P.T @ Hff @ P
    A = 0.5 * (A + A.T)
    tiny = 1e-12 * max(float(np.max(np.abs(h))), 1e-300)
    try:
        mu = float(scipy.linalg.eigvalsh(A, subset_by_index=[0, 0])[0])
        mu = mu - abs(mu) * 1e-7 - tiny
        out["uniform"] = h - mu
    except (np.linalg.LinAlgError, ValueError):  # pragma: no cover - LAPACK failure
        lam = float(np.linalg.eigvalsh(Hff)[0])
        out["uniform"] = h - (lam - abs(lam) * 1e-7 - tiny)
    if np.all(h > 0):
        B = P.T @ np.diag(h) @ P
        B = 0.5 * (B + B.T)
        try:
            mu2 = float(scipy.linalg.eigh(A, B, eigvals_only=True, subset_by_index=[0, 0])[0])
            mu2 = mu2 - abs(mu2) * 1e-7 - 1e-12
            out["scaled"] = h * (1.0 - mu2)
        except (np.linalg.LinAlgError, ValueError):  # pragma: no cover
            pass
    return out


def _root_qp(p: Problem, s: np.ndarray, iters: int = 3000) -> tuple[float, np.ndarray]:
    """Fully solved root relaxation: (certified bound, y (n,))."""
    n = p.n_free
    Q = np.ascontiguousarray(p.W + np.diag(s))
    b = p.u - s
    F = np.arange(n, dtype=np.int64)
    y = np.full(n, p.m / n)
    work = np.zeros((5, n))
    tol = 1e-10 * p.scale
    lb, _, _ = kn.qp_bound(Q, b, F, n, p.m, y, np.inf, -np.inf, iters, tol, work)
    return float(lb), y


def _row_values(p: Problem) -> np.ndarray:
    """Root row-bound values v_j = u_j + sum of the m-1 smallest W_jk (n,)."""
    n, m = p.n_free, p.m
    W = p.W
    v = p.u.copy()
    if m > 1:
        for j in range(n):
            row = np.delete(W[j], j)
            v[j] += np.sort(row)[: m - 1].sum()
    return v


def run_bnb(
    p: Problem,
    k: int,
    *,
    time_limit: float | None = None,
    node_limit: int | None = None,
    tie_tol: float = 1e-9,
    seed: int = 0,
    bound: str = "both",
    qp_iter: int = 20,
    qp_min_free: int = 6,
    order: str = "relax",
    seed_iters: int | None = None,
    chunk_nodes: int = 20000,
    dfs_share: float = 0.7,
) -> BnBResult:
    """K-best branch-and-bound on a reduced problem (requires 2 <= m <= n - 1 for branching)."""
    t0 = time.perf_counter()
    n, m = p.n_free, p.m
    if bound not in ("row", "qp", "both"):
        raise ValueError(f"bound must be 'row', 'qp' or 'both', got {bound!r}")
    use_row = bound in ("row", "both")
    use_qp = bound in ("qp", "both")
    k_eff = int(min(k, p.n_feasible))

    # 1. heuristic seed: K distinct states and the cut-off
    seed_sets, seed_info = run_tabu(p, k_eff, seed=seed, n_iter=seed_iters)
    seed_E = sorted(_energy_free(p, s) for s in seed_sets)
    slack = tie_tol * p.scale
    # kernels work with reduced energies (the forced-removed constant left out)
    seed_cutoff = seed_E[k_eff - 1] - p.const if len(seed_E) >= k_eff else np.inf
    t_seed = time.perf_counter() - t0

    # 2. relaxation shift and root bound
    shifts = _relaxation_shifts(p)
    best_name, best_lb, best_y = next(iter(shifts)), -np.inf, np.full(n, m / n)
    root_bounds = {}
    if use_qp or order == "relax":
        for name, s in shifts.items():
            lb, y = _root_qp(p, s)
            root_bounds[name] = lb
            if lb > best_lb:
                best_name, best_lb, best_y = name, lb, y
    s_shift = shifts[best_name]
    Q = np.ascontiguousarray(p.W + np.diag(s_shift))

    # 3. static order
    v = _row_values(p)
    row_root = float(np.sort(v)[:m].sum())
    if order == "relax":
        perm = np.lexsort((v, -np.round(best_y, 9)))
    elif order == "row":
        perm = np.argsort(v, kind="stable")
    else:
        raise ValueError(f"order must be 'relax' or 'row', got {order!r}")
    perm = perm.astype(np.int64)
    T = kn.build_row_table(p.W, perm, m) if use_row else np.zeros((1, 1, 1))
    root_bound = max(row_root if use_row else -np.inf, best_lb if use_qp else -np.inf)
    t_setup = time.perf_counter() - t0

    # 4. search
    topE, topM, ts = new_store(k_eff, p.words)
    stack_phase = np.zeros(n + 1, np.int64)
    stack_dir = np.zeros(n + 1, np.int64)
    stack_r = np.zeros(n + 1, np.int64)
    stack_E = np.zeros(n + 1)
    stack_bnd = np.full(n + 1, -np.inf)
    stack_r[0] = m
    Y = np.tile(best_y, (n + 1, 1))
    g = np.zeros(n)
    mask = np.zeros(p.words, np.uint64)
    pos = np.zeros(1, np.int64)
    stats = np.zeros(8, np.int64)
    complete = False
    deadline = None if time_limit is None else t0 + float(time_limit)
    # with a budget, depth-first search gets the first `dfs_share` of it, then best-first search
    # over the open subtrees tightens the certificate (and may still finish the proof)
    dfs_deadline = None
    if time_limit is not None:
        dfs_deadline = t0 + t_setup + dfs_share * max(0.0, float(time_limit) - t_setup)
    dfs_nodes = None if node_limit is None else max(1, int(dfs_share * int(node_limit)))
    while True:
        budget = chunk_nodes
        if dfs_nodes is not None:
            budget = min(budget, dfs_nodes - int(stats[kn.ST_NODES]))
            if budget <= 0:
                break
        complete = kn.bnb_kbest(
            p.W, p.u, Q, s_shift, perm, T, m, topE, topM, ts, seed_cutoff, slack,
            use_row, use_qp, qp_iter, qp_min_free,
            stack_phase, stack_dir, stack_r, stack_E, stack_bnd, Y, g, mask, pos,
            budget, stats,
        )
        if complete:
            break
        if dfs_deadline is not None and time.perf_counter() >= dfs_deadline:
            break
    t_search = time.perf_counter() - t0 - t_setup

    # 5. certificate
    sets = store_sets(p, topE, topM, ts)
    # the seed states are valid states too (needed when the search stopped early)
    sets = list(dict.fromkeys(sets + list(seed_sets)))
    bf_nodes = 0
    if complete:
        open_bound = np.inf
    else:
        stack_bound = float(kn.open_lower_bound(stack_phase, stack_bnd, pos, root_bound))
        pending = _pending_nodes(perm, stack_phase, stack_dir, stack_bnd, pos)
        pos_of = {int(v): i for i, v in enumerate(p.free)}
        forced = set(p.forced)
        found = [tuple(pos_of[b] for b in s_ if b not in forced) for s_ in sets]
        bf_max = 10**12 if node_limit is None else max(0, int(node_limit) - int(stats[kn.ST_NODES]))
        open_bound, new_states, bf_nodes = _best_first(
            p, Q, s_shift, perm, pending, found, k_eff, slack, deadline, bf_max)
        if not np.isfinite(open_bound):
            complete = True  # every open subtree was closed by the best-first phase
        else:
            open_bound = max(open_bound, stack_bound)
        sets = list(dict.fromkeys(sets + free_sets_to_removed(p, new_states)))
    info = {
        "nodes": int(stats[kn.ST_NODES]) + bf_nodes,
        "nodes_best_first": bf_nodes,
        "leaves": int(stats[kn.ST_LEAVES]),
        "pruned_row": int(stats[kn.ST_PRUNE_ROW]),
        "pruned_qp": int(stats[kn.ST_PRUNE_QP]),
        "qp_calls": int(stats[kn.ST_QP_CALLS]),
        "qp_iters": int(stats[kn.ST_QP_ITERS]),
        "relaxation_shift": best_name,
        "root_bound": root_bound + p.const,
        "root_bound_row": row_root + p.const,
        "root_bounds_qp": {k_: v_ + p.const for k_, v_ in root_bounds.items()},
        "seed_cutoff": float(seed_cutoff + p.const),
        "seed": seed_info,
        "bound": bound,
        "order": order,
        "time_seed_s": t_seed,
        "time_setup_s": t_setup,
        "time_search_s": t_search,
        "complete": bool(complete),
    }
    return BnBResult(sets=sets, complete=bool(complete), open_bound=open_bound + p.const,
                     root_bound=root_bound + p.const, info=info)


def _energy_free(p: Problem, removed: tuple[int, ...]) -> float:
    idx = np.array(removed, dtype=np.int64)
    e = float(np.sum(p.H[np.ix_(idx, idx)])) if idx.size else 0.0
    if p.has_linear:
        e += float(np.sum(p.c[idx]))
    return e


def _pending_nodes(
    perm: np.ndarray, stack_phase: np.ndarray, stack_dir: np.ndarray, stack_bnd: np.ndarray,
    pos: np.ndarray,
) -> list[tuple[tuple[int, ...], int, float]]:
    """Unexplored subtrees of a stopped depth-first search: (removed free vars, depth, bound).

    They are the second children of path nodes still in their first child (phase 1) and the
    current, not yet visited node; the bound is the stored bound of the parent.
    """
    d_cur = int(pos[0])
    if d_cur < 0:
        return []
    out: list[tuple[tuple[int, ...], int, float]] = []
    path: list[int] = []
    for a in range(d_cur):
        first_inc = stack_dir[a] == 1
        if stack_phase[a] == 1:
            # pending: the other child of node a
            S = tuple(path + [int(perm[a])]) if not first_inc else tuple(path)
            out.append((S, a + 1, float(stack_bnd[a])))
            if first_inc:
                path.append(int(perm[a]))
        else:  # phase 2: the path goes through the second child
            if not first_inc:
                path.append(int(perm[a]))
    if stack_phase[d_cur] == 0:
        pb = float(stack_bnd[d_cur - 1]) if d_cur > 0 else -np.inf
        out.append((tuple(path), d_cur, pb))
    return out


def _best_first(
    p: Problem, Q: np.ndarray, s_shift: np.ndarray, perm: np.ndarray,
    pending: list[tuple[tuple[int, ...], int, float]], found: list[tuple[int, ...]], k: int,
    slack: float, deadline: float | None, max_nodes: int,
) -> tuple[float, list[tuple[int, ...]], int]:
    """Best-first continuation over the pending subtrees of a stopped DFS (reduced energies).

    Each open node is bounded with a converged relaxation (max with its parent's bound); the node
    of lowest bound is split on the next variable of the static order. Leaves (r = 0, r = |F|,
    r = 1) are evaluated. Stops at `deadline` / `max_nodes` or when no open node is left.
    Returns (certified bound on every state still unexplored (+inf if none), new states found
    as free-variable tuples, nodes expanded).
    """
    import heapq

    n, m = p.n_free, p.m
    H = p.H[np.ix_(p.free, p.free)]
    hdiag = np.diag(H)
    work = np.zeros((5, n))
    tol = 1e-9 * p.scale

    def e_of(S: tuple[int, ...]) -> float:
        if not S:
            return 0.0
        idx = np.array(S, dtype=np.int64)
        return float(H[np.ix_(idx, idx)].sum() + (p.u[idx] - hdiag[idx]).sum())

    best: list[float] = sorted(e_of(S) for S in found)[:k]  # reduced energies, ascending
    new_states: list[tuple[int, ...]] = []

    def offer(S: tuple[int, ...], e: float) -> None:
        if len(best) < k or e <= best[-1] + slack:
            new_states.append(tuple(sorted(S)))
            best.append(e)
            best.sort()
            del best[k:]

    def cutoff() -> float:
        return best[-1] if len(best) >= k else np.inf

    heap: list[tuple[float, int, tuple[int, ...], int]] = []
    counter = 0

    def push(S: tuple[int, ...], d: int, parent_bound: float) -> None:
        nonlocal counter
        r = m - len(S)
        nf = n - d
        if r < 0 or r > nf:
            return
        if r == 0:
            offer(S, e_of(S))
            return
        if r == nf:
            T = S + tuple(int(j) for j in perm[d:])
            offer(T, e_of(T))
            return
        E = e_of(S)
        idx = np.array(S, dtype=np.int64)
        g = p.W[idx].sum(axis=0) if S else np.zeros(n)
        if r == 1:
            for j in perm[d:]:
                offer(S + (int(j),), E + p.u[j] + 2.0 * g[j])
            return
        b = p.u - s_shift + 2.0 * g
        F = np.ascontiguousarray(perm[d:])
        y = np.full(n, r / nf)
        qb, _, _ = kn.qp_bound(Q, b, F, nf, r, y, cutoff() + slack - E, -np.inf, 300, tol, work)
        bound = max(parent_bound, E + float(qb))
        if bound > cutoff() + slack:
            return
        counter += 1
        heapq.heappush(heap, (bound, counter, S, d))

    for S, d, pb in pending:
        push(S, d, pb)
    expanded = 0
    while heap:
        if deadline is not None and time.perf_counter() >= deadline:
            break
        if expanded >= max_nodes:
            break
        bound, _, S, d = heapq.heappop(heap)
        if bound > cutoff() + slack:
            continue
        expanded += 1
        j = int(perm[d])
        push(S + (j,), d + 1, bound)
        push(S, d + 1, bound)
    live = [bd for bd, _, _, _ in heap if bd <= cutoff() + slack]
    lb = min(live) if live else np.inf
    return lb, new_states, expanded
