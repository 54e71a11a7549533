"""Heuristic K-best solvers: swap-move tabu search and parallel tempering.

Both move on the fixed-cardinality manifold (1-in/1-out swaps keep sum x = M; the energy change of a
swap is O(1) from the local field g = W x), record every low state they meet into a deduplicated
top-K store, and therefore return K *distinct* low-energy states. They carry no optimality proof;
`solve` reports the certified root lower bound next to them so the gap is visible.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from cboprune.solvers import _kernels as kn
from cboprune.solvers._problem import Problem, new_store, store_sets

logger = logging.getLogger(__name__)


def greedy_state(p: Problem) -> np.ndarray:
    """Greedy start: add, one at a time, the free block with the smallest marginal energy.

    Returns a bool array (n,) with m entries set.
    """
    n, m = p.n_free, p.m
    x = np.zeros(n, dtype=bool)
    g = np.zeros(n)
    for _ in range(m):
        cost = p.u + 2.0 * g
        cost[x] = np.inf
        j = int(np.argmin(cost))
        x[j] = True
        g += p.W[:, j]
    return x


def run_tabu(
    p: Problem,
    k: int,
    *,
    seed: int = 0,
    n_iter: int | None = None,
    tenure: int | None = None,
    n_restarts: int | None = None,
    time_limit: float | None = None,
) -> tuple[list[tuple[int, ...]], dict[str, Any]]:
    """Swap-move tabu search; returns (up to K distinct removed sets, info).

    n_iter defaults to max(2000, 40 n) iterations split over `n_restarts` (default 8) perturbed
    restarts from the best state; with `time_limit` the run is repeated with new seeds until the
    time is spent.
    """
    t0 = time.perf_counter()
    n, m = p.n_free, p.m
    k_eff = int(max(1, min(k, p.n_feasible)))
    if n_iter is None:
        n_iter = max(2000, 40 * n)
    if tenure is None:
        tenure = max(1, min(m, n - m) // 4)
    if n_restarts is None:
        n_restarts = 8
    topE, topM, ts = new_store(k_eff, p.words)
    x0 = greedy_state(p)
    rounds = 0
    iters = 0
    while True:
        iters += int(kn.tabu_kbest(p.W, p.u, m, x0, int(n_iter), int(tenure), int(n_restarts),
                                   int(seed) + rounds, topE, topM, ts))
        rounds += 1
        if time_limit is None or time.perf_counter() - t0 >= time_limit:
            break
        x0 = np.zeros(n, dtype=bool)
        x0[np.random.default_rng(seed + rounds).choice(n, m, replace=False)] = True
    info = {"iterations": iters, "rounds": rounds, "tenure": int(tenure),
            "time_s": time.perf_counter() - t0}
    return store_sets(p, topE, topM, ts), info


def run_tempering(
    p: Problem,
    k: int,
    *,
    seed: int = 0,
    n_sweeps: int | None = None,
    n_replicas: int = 16,
    time_limit: float | None = None,
    polish: bool = True,
) -> tuple[list[tuple[int, ...]], dict[str, Any]]:
    """Parallel tempering with swap moves; returns (up to K distinct removed sets, info).

    Temperatures are geometric between 1e-3 and 1 times the median |energy change| of random swaps
    from the greedy state. With `polish`, a short tabu run from the greedy state is merged in.
    """
    t0 = time.perf_counter()
    n, m = p.n_free, p.m
    k_eff = int(max(1, min(k, p.n_feasible)))
    if n_sweeps is None:
        n_sweeps = max(200, 20000 // max(n, 1))
    rng = np.random.default_rng(seed)
    x = greedy_state(p)
    g = p.W @ x
    ins, outs = np.flatnonzero(x), np.flatnonzero(~x)
    if ins.size and outs.size:
        i = rng.choice(ins, 256)
        j = rng.choice(outs, 256)
        d = np.abs(p.u[j] + 2 * g[j] - p.u[i] - 2 * g[i] - 2 * p.W[i, j])
        t_hi = float(np.median(d)) or 1.0
    else:
        t_hi = 1.0
    temps = np.geomspace(1e-3 * t_hi, t_hi, n_replicas)
    topE, topM, ts = new_store(k_eff, p.words)
    rounds = 0
    accepted = 0
    while True:
        accepted += int(kn.tempering_kbest(p.W, p.u, m, temps, int(n_sweeps), int(seed) + rounds,
                                           topE, topM, ts))
        rounds += 1
        if time_limit is None or time.perf_counter() - t0 >= time_limit:
            break
    sets = store_sets(p, topE, topM, ts)
    info: dict[str, Any] = {"sweeps": int(n_sweeps) * rounds, "replicas": n_replicas,
                            "accepted": accepted, "t_max": t_hi}
    if polish:
        tsets, _ = run_tabu(p, k, seed=seed)
        sets = list(dict.fromkeys(sets + tsets))
    info["time_s"] = time.perf_counter() - t0
    return sets, info
