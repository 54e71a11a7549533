"""Exact K-best branch-and-bound with certified anytime bounds.

Outline (details in docs/solver.md):

1. seed: tabu search returns K distinct low states; its K-th energy is the initial cut-off;
2. relaxation: a diagonal shift s makes Q = W + diag(s) PSD on {sum y = 0}, so
   min y^T Q y + (u - s + 2 g)^T y over {0 <= y <= 1, sum y = r} is a convex lower bound of every
   completion (y_j^2 = y_j on binaries); the best closed-form shift first, per-depth tightening;
3. static variable order by the root relaxation (values near 1 first);
4. quick phase: compiled depth-first search (row bound, then the warm-started relaxation bound,
   prune when bound > cut-off + slack); small cases end here;
5. otherwise: the doubly non-negative surrogate W - N (N >= 0 from the DNN relaxation: every
   bound of W - N bounds W) when it raises the root bound, its optimized (QCR-type) shift, then
   a compiled best-first search with depth-first
   dives from the root, keeping the best cut-off; on a time / node budget the minimum bound of
   the open nodes is the certificate (it rises monotonically with the search).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np

from cboprune.solvers import _kernels as kn
from cboprune.solvers._bounds import (
    bound_view,
    depth_corrections,
    dnn_surrogate,
    optimize_shift,
    relaxation_shifts,
    root_qp,
    row_values,
)
from cboprune.solvers._problem import Problem, free_sets_to_removed, new_store, store_sets
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


class _Tree:
    """Search state over one shift and static order: stacks (dives), node pool, top-K store."""

    def __init__(self, p: Problem, k: int, s: np.ndarray, y: np.ndarray, v: np.ndarray,
                 use_row: bool, order: str, lam_every: int = 1, bounds: Problem | None = None) -> None:
        """`bounds`: the problem the relaxation reads (`bound_view` of a surrogate), default `p`."""
        n, m = p.n_free, p.m
        pb = p if bounds is None else bounds
        self.s, self.y = s, y
        self.Q = np.ascontiguousarray(pb.W + np.diag(s))
        if order == "relax":
            perm = np.lexsort((v, -np.round(y, 9)))
        elif order == "row":
            perm = np.argsort(v, kind="stable")
        elif order == "frac":  # most fractional first: both children move the bound
            perm = np.lexsort((v, np.round(np.abs(y - 0.5), 9)))
        else:
            raise ValueError(f"order must be 'relax', 'row' or 'frac', got {order!r}")
        self.perm = perm.astype(np.int64)
        self.lam = depth_corrections(pb, s, self.perm, lam_every)
        self.T = kn.build_row_table(p.W, self.perm, m) if use_row else np.zeros((1, 1, 1))
        self.topE, self.topM, self.ts = new_store(k, p.words)
        self.phase = np.zeros(n + 1, np.int64)
        self.dir = np.zeros(n + 1, np.int64)
        self.r = np.zeros(n + 1, np.int64)
        self.r[0] = m
        self.E = np.zeros(n + 1)
        self.bnd = np.full(n + 1, -np.inf)
        self.Y = np.tile(y, (n + 1, 1))
        self.g = np.zeros(n)
        self.mask = np.zeros(p.words, np.uint64)
        self.pos = np.zeros(1, np.int64)
        self.stats = np.zeros(8, np.int64)
        self.pool: tuple | None = None
        self.dive = np.zeros(2, np.int64)
        self.dive_bnd = np.zeros(1)

    def run_dfs(self, p: Problem, cutoff: float, slack: float, flags: tuple,
                budget: int) -> bool:
        """Resume the depth-first search of the whole tree for at most `budget` nodes."""
        return bool(kn.bnb_kbest(
            p.W, p.u, self.Q, self.s, self.lam, self.perm, self.T, p.m, self.topE, self.topM,
            self.ts, cutoff, slack, *flags, self.phase, self.dir, self.r, self.E, self.bnd,
            self.Y, self.g, self.mask, self.pos, budget, self.stats, 0))

    def start_pool(self, p: Problem, capacity: int, root_bound: float) -> None:
        """Node pool of `capacity` nodes (~ 4 n + 8 words + 32 bytes each) holding the root."""
        cap = max(16, int(capacity))
        self.pool = (np.empty(cap), np.empty(cap, np.int64), np.empty(cap, np.int64),
                     np.empty(cap), np.zeros((cap, p.words), np.uint64),
                     np.zeros((cap, p.n_free), np.float32), np.zeros(1, np.int64))
        kn._heap_push(*self.pool, root_bound, 0, p.m, 0.0, np.zeros(p.words, np.uint64), self.y)

    def run_bf(self, p: Problem, cutoff: float, slack: float, flags: tuple, budget: int,
               dive_free: int, bf_qp_iter: int, batch: int) -> bool:
        """Resume the best-first search with dives for at most `budget` nodes."""
        return bool(kn.bf_kbest(
            p.W, p.u, self.Q, self.s, self.lam, self.perm, self.T, p.m, self.topE, self.topM,
            self.ts, cutoff, slack, *flags, *self.pool, dive_free, bf_qp_iter, batch,
            self.phase, self.dir, self.r, self.E, self.bnd, self.Y, self.g, self.mask, self.pos,
            self.dive, self.dive_bnd, budget, self.stats))

    def open_bound(self) -> float:
        """Certified bound on every state not yet explored by the best-first search."""
        hb, hs = self.pool[0], self.pool[6]
        lb = float(hb[0]) if hs[0] > 0 else np.inf
        if self.dive[1] == 1:  # every node of the dive lies below its root: max with its bound
            db = float(self.dive_bnd[0])
            lb = min(lb, max(db, float(kn.open_lower_bound(self.phase, self.bnd, self.pos, db,
                                                           int(self.dive[0])))))
        return lb

    def cutoff(self, seed_cutoff: float) -> float:
        return float(kn.topk_cutoff(self.topE, self.ts, seed_cutoff))

    @property
    def nodes(self) -> int:
        return int(self.stats[kn.ST_NODES])


def _run_chunks(step: Callable[[int], bool], nodes: Callable[[], int], chunk: int,
                node_cap: int | None, deadline: float | None,
                report: Callable[[], None] | None = None, chunk_s: float = 0.5) -> bool:
    """Call `step(budget)` until it completes, `node_cap` nodes or `deadline`.

    The node budget per call adapts so that one call takes about `chunk_s` seconds (at most
    `chunk` nodes): the deadline is kept within about that on a loaded machine too.
    """
    size = min(chunk, 200) if deadline is not None else chunk
    while True:
        if deadline is not None and time.perf_counter() >= deadline:
            return False
        budget = size
        if node_cap is not None:
            budget = min(budget, node_cap - nodes())
            if budget <= 0:
                return False
        t, n0 = time.perf_counter(), nodes()
        if step(budget):
            return True
        rate = (nodes() - n0) / max(time.perf_counter() - t, 1e-6)
        size = int(min(chunk, max(100, rate * chunk_s)))
        if deadline is not None:
            size = int(max(100, min(size, rate * max(deadline - time.perf_counter(), 0.0))))
        if report is not None:
            report()


def default_threads() -> int:
    """Threads for the best-first bounding: all cores, or 1 when the machine is oversubscribed.

    Measured on the shared 2-core machine at load ~8: 2 threads did 6 244 best-first
    expansions in 30 s, 1 thread 9 410 (each batch waits for a thread the OS has descheduled).
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0] > cores
    except OSError:  # pragma: no cover - no load average on this platform
        busy = False
    return 1 if busy else cores


def _root_shift(p: Problem, use_qp: bool, order: str) -> tuple[str, np.ndarray, float,
                                                               np.ndarray, dict[str, float]]:
    """Best closed-form shift by root bound: (name, s, bound, root solution y, all bounds)."""
    n, m = p.n_free, p.m
    shifts = relaxation_shifts(p)
    best_name, best_lb, best_y = next(iter(shifts)), -np.inf, np.full(n, m / n)
    root_bounds: dict[str, float] = {}
    if use_qp or order == "relax":
        for name, s in shifts.items():
            lb, y = root_qp(p, s)
            root_bounds[name] = lb
            if lb > best_lb:
                best_name, best_lb, best_y = name, lb, y
    return best_name, shifts[best_name], best_lb, best_y, root_bounds


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
    quick_s: float = 1.0,
    shift_share: float = 0.05,
    shift_max_s: float = 20.0,
    pool_mb: float = 256.0,
    dive_free: int | None = None,
    bf_qp_iter: int = 40,
    bf_order: str = "frac",
    bf_batch: int = 8,
    surrogate: str = "dnn",
    dnn_min_free: int = 8,
    dnn_share: float = 0.25,
    dnn_max_s: float = 60.0,
    threads: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> BnBResult:
    """K-best branch-and-bound on a reduced problem (requires 2 <= m <= n - 1 for branching).

    Quick phase: depth-first search with the best closed-form shift for `quick_s` seconds (the
    small cases finish there). Then the shift is optimized (at most `shift_share` of the time
    left, `shift_max_s` s) and a best-first search with dives restarts from the root with the
    stronger bound and the best cut-off so far (`surrogate="dnn"`: first the doubly non-negative
    surrogate, kept when its root bound is higher, for problems of >= `dnn_min_free` free
    variables, its solve capped at `dnn_share` of the time left and `dnn_max_s` s; "none": the
    diagonal shift only); nodes with <= `dive_free` free variables
    (default n // 4) or a full pool (`pool_mb` MiB) are finished depth-first. `threads` bound
    the best-first children in parallel (default: `default_threads()`). `progress`, if given,
    is called after every chunk with {"nodes", "lower_bound", "cutoff", "elapsed_s"}.
    """
    t0 = time.perf_counter()
    n, m = p.n_free, p.m
    if bound not in ("row", "qp", "both"):
        raise ValueError(f"bound must be 'row', 'qp' or 'both', got {bound!r}")
    if surrogate not in ("dnn", "none"):
        raise ValueError(f"surrogate must be 'dnn' or 'none', got {surrogate!r}")
    use_row = bound in ("row", "both")
    use_qp = bound in ("qp", "both")
    flags = (use_row, use_qp, qp_iter, qp_min_free)
    k_eff = int(min(k, p.n_feasible))
    off = p.W[~np.eye(n, dtype=bool)]
    if (off.size == 0 or not np.ptp(off)) and (n == 0 or not np.ptp(p.u)):
        # every state has the same energy m u + m (m - 1) w (H = 0: gates without effect; or
        # equal blocks, equally correlated): the K lexicographically first states are the answer,
        # the search could prune nothing among exact ties
        import itertools


        sets = free_sets_to_removed(p, itertools.islice(itertools.combinations(range(n), m), k_eff))
        e = float(m * p.u[0] + m * (m - 1) * (off[0] if off.size else 0.0)) if n else 0.0
        return BnBResult(sets=sets, complete=True, open_bound=np.inf, root_bound=e + p.const,
                         info={"nodes": 0, "constant_energy": True, "root_bound": e + p.const,
                               "relaxation_shift": "none", "complete": True,
                               "time_seed_s": 0.0, "time_setup_s": time.perf_counter() - t0, "time_search_s": 0.0})
    dive_free = max(8, n // 4) if dive_free is None else int(dive_free)

    # 1. heuristic seed: K distinct states and the cut-off
    seed_sets, seed_info = run_tabu(p, k_eff, seed=seed, n_iter=seed_iters)
    seed_E = sorted(_energy_free(p, s) for s in seed_sets)
    slack = tie_tol * p.scale
    # kernels work with reduced energies (the forced-removed constant left out)
    cutoff = seed_E[k_eff - 1] - p.const if len(seed_E) >= k_eff else np.inf
    seed_cutoff = cutoff
    t_seed = time.perf_counter() - t0

    # 2. closed-form shift, root bounds, static order
    best_name, s0, best_lb, best_y, root_bounds = _root_shift(p, use_qp, order)
    v = row_values(p)
    row_root = float(np.sort(v)[:m].sum())
    # the quick tree's per-depth tightening at 8 depths only: small cases are setup-bound
    tree = _Tree(p, k_eff, s0, best_y, v, use_row, order, lam_every=max(1, n // 8))
    t_setup = time.perf_counter() - t0

    def root_bound() -> float:
        return max(row_root if use_row else -np.inf, best_lb if use_qp else -np.inf)

    def report() -> None:
        if progress is not None:
            progress({"nodes": spent + tree.nodes, "elapsed_s": time.perf_counter() - t0,
                      "lower_bound": (tree.open_bound() if tree.pool is not None
                                      else root_bound()) + p.const,
                      "cutoff": tree.cutoff(cutoff) + p.const})

    # 3. quick phase: depth-first search
    deadline = None if time_limit is None else t0 + float(time_limit)
    quick_end = t0 + t_setup + quick_s
    spent = 0
    complete = _run_chunks(lambda b: tree.run_dfs(p, cutoff, slack, flags, b),
                           lambda: tree.nodes, chunk_nodes, node_limit,
                           quick_end if deadline is None else min(quick_end, deadline), report)
    early_sets: list[tuple[int, ...]] = []
    opt_info: dict[str, Any] = {}
    out_of_budget = (deadline is not None and time.perf_counter() >= deadline) or (
        node_limit is not None and tree.nodes >= node_limit)
    if not complete and not out_of_budget:
        # 4. optimized shift; restart best-first from the root with the best cut-off so far
        cutoff = tree.cutoff(cutoff)
        early_sets = store_sets(p, tree.topE, tree.topM, tree.ts)
        spent = tree.nodes
        s, y, pb = s0, best_y, p
        if use_qp and n >= qp_min_free:
            def left() -> float:
                return 600.0 if deadline is None else deadline - time.perf_counter()

            if surrogate == "dnn" and n >= dnn_min_free:
                found = dnn_surrogate(p, time_budget=min(dnn_max_s, dnn_share * left()), y0=best_y)
                if found is not None:
                    W_bound, s_dnn, lb_dnn, y_dnn, dnn_info = found
                    opt_info["dnn"] = {**dnn_info, "root_bound": lb_dnn + p.const}
                    if lb_dnn > best_lb:  # the surrogate is only used where it bounds better
                        best_name, best_lb, s, y, pb = "dnn", lb_dnn, s_dnn, y_dnn, bound_view(p, W_bound)
                        root_bounds["dnn"] = lb_dnn
            if pb is p:  # the DNN's own diagonal is already its dual optimum (ascent gained < 0.1 %)
                t2 = time.perf_counter()
                s_opt, lb_opt, y_opt, its = optimize_shift(
                    p, s, y, time_budget=max(min(shift_max_s, shift_share * left()), 0.0))
                opt_info.update({"shift_opt_iters": its, "shift_opt_s": time.perf_counter() - t2})
                if lb_opt > best_lb:
                    best_name, best_lb, s, y = "optimized", lb_opt, s_opt, y_opt
                    root_bounds[best_name] = lb_opt
        tree = _Tree(p, k_eff, s, y, v, use_row, bf_order, bounds=pb)
        tree.start_pool(p, int(pool_mb * 2**20 / (4 * n + 8 * p.words + 32)), root_bound())
        cap = None if node_limit is None else node_limit - spent
        n_threads = default_threads() if threads is None else max(1, int(threads))
        opt_info["threads"] = n_threads
        previous = numba.get_num_threads()
        numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
        try:
            complete = _run_chunks(
                lambda b: tree.run_bf(p, cutoff, slack, flags, b, dive_free, bf_qp_iter,
                                      bf_batch),
                lambda: tree.nodes, chunk_nodes, cap, deadline, report)
        finally:
            numba.set_num_threads(previous)
    t_search = time.perf_counter() - t0 - t_setup
    return _result(p, tree, complete, seed_sets + early_sets, spent, root_bound(), row_root,
                   root_bounds, best_name, seed_cutoff, {
                       **opt_info, "seed": seed_info, "bound": bound, "order": order,
                       "time_seed_s": t_seed, "time_setup_s": t_setup, "time_search_s": t_search})


def _result(p: Problem, tree: _Tree, complete: bool, extra_sets: list[tuple[int, ...]],
            spent: int, root_bound: float, row_root: float, root_bounds: dict[str, float],
            shift: str, seed_cutoff: float, extra: dict[str, Any]) -> BnBResult:
    """Collect the states and the certificate of a finished or stopped search."""
    sets = store_sets(p, tree.topE, tree.topM, tree.ts)
    # the seed (and quick-phase) states are valid states too (needed when stopped early)
    sets = list(dict.fromkeys(sets + list(extra_sets)))
    if complete:
        open_bound = np.inf
    elif tree.pool is None:  # stopped inside the quick depth-first phase
        open_bound = max(root_bound, float(kn.open_lower_bound(tree.phase, tree.bnd, tree.pos,
                                                               root_bound, 0)))
    else:
        open_bound = tree.open_bound()
    st = tree.stats
    info = {
        "nodes": spent + int(st[kn.ST_NODES]),
        "nodes_quick_dfs": spent,
        "nodes_best_first": int(st[kn.ST_BF_EXPANDED]),
        "dives": int(st[kn.ST_DIVES]),
        "leaves": int(st[kn.ST_LEAVES]),
        "pruned_row": int(st[kn.ST_PRUNE_ROW]),
        "pruned_qp": int(st[kn.ST_PRUNE_QP]),
        "qp_calls": int(st[kn.ST_QP_CALLS]),
        "qp_iters": int(st[kn.ST_QP_ITERS]),
        "relaxation_shift": shift,
        "root_bound": root_bound + p.const,
        "root_bound_row": row_root + p.const,
        "root_bounds_qp": {k_: v_ + p.const for k_, v_ in root_bounds.items()},
        "seed_cutoff": float(seed_cutoff + p.const),
        **extra,
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
