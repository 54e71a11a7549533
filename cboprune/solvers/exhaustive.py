"""Reference solver: compiled exhaustive enumeration of all C(n, m) states.

States are visited in revolving-door (Gray code) order, one block swapped in and one out per step,
so each step costs O(1) for the energy and O(n) for the local field g = W x. It is the ground
truth the branch-and-bound is tested against, and the baseline of `benchmarks/solver.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any


from cboprune.core.ranking import Ranking
from cboprune.solvers import _kernels as kn
from cboprune.solvers._problem import (
    Problem,
    finalize,
    make_problem,
    new_store,
    store_sets,
)

logger = logging.getLogger(__name__)


def run_enumeration(p: Problem, k: int, max_states: int = 0) -> tuple[list[tuple[int, ...]], int, float]:
    """Run the compiled enumeration on a reduced problem.

    Returns (removed sets of the K best, number of states visited, seconds).
    `max_states` > 0 stops after that many states (used to time a fraction of the space).
    """
    k_eff = int(min(k, p.n_feasible)) if max_states <= 0 else int(k)
    topE, topM, ts = new_store(max(k_eff, 1), p.words)
    t0 = time.perf_counter()
    visited = kn.enumerate_kbest(p.W, p.u, p.m, topE, topM, ts, int(max_states))
    dt = time.perf_counter() - t0
    return store_sets(p, topE, topM, ts), int(visited), dt


def enumerate_exhaustive(
    H: Any,
    n_remove: int,
    k: int,
    *,
    linear: Any = None,
    keep: Iterable[int] = (),
    force_remove: Iterable[int] = (),
    removable: Iterable[int] | None = None,
    tie_tol: float = 1e-9,
) -> Ranking:
    """The K lowest states by visiting all C(n, m) of them (reference; exponential time).

    Parameters
    ----------
    H : (N, N) symmetric array
    n_remove : int, M
    k : int, number of lowest states (all feasible states if larger)
    linear : (N,) array, optional linear term c
    keep, force_remove, removable : constraints, see `solve`
    tie_tol : relative tolerance for marking ties (see `solve`)

    Returns
    -------
    Ranking with exact=True.
    """
    p = make_problem(H, n_remove, k, linear=linear, keep=keep, force_remove=force_remove,
                     removable=removable)
    if p.n_feasible > 10**11:
        logger.warning("enumerating C(%d, %d) = %.3g states will take very long",
                       p.n_free, p.m, float(p.n_feasible))
    sets, visited, dt = run_enumeration(p, k)
    info = {"solver": "enumerate", "states_visited": visited, "time_s": dt}
    return finalize(p, sets, tie_tol=tie_tol, exact=True, lower_bound=None, info=info)
