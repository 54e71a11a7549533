"""`solve`: one entry point over every CBO solver, returning the shared `Ranking`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from cboprune.core.choices import SOLVER_METHODS
from cboprune.core.ranking import Ranking
from cboprune.solvers._bounds import relaxation_shifts, root_qp, row_values
from cboprune.solvers._problem import Problem, finalize, make_problem
from cboprune.solvers.bnb import run_bnb
from cboprune.solvers.exhaustive import run_enumeration
from cboprune.solvers.heuristics import run_tabu, run_tempering

logger = logging.getLogger(__name__)

METHODS = SOLVER_METHODS
#: "auto" enumerates when the feasible space has at most this many states.
AUTO_ENUMERATE_MAX = 2_000_000
#: "auto" budget (seconds) when neither time_limit nor node_limit is given.
AUTO_TIME_LIMIT = 300.0


def root_lower_bound(p: Problem) -> float:
    """Certified lower bound on every feasible state: max(row bound, best convex relaxation)."""
    if p.m == 0 or p.m == p.n_free:
        return -np.inf
    v = row_values(p)
    lb = float(np.sort(v)[: p.m].sum())
    for s in relaxation_shifts(p).values():
        lb = max(lb, root_qp(p, s)[0])
    return lb + p.const


def solve(
    H: Any,
    n_remove: int,
    k: int = 10,
    *,
    linear: Any = None,
    keep: Iterable[int] = (),
    force_remove: Iterable[int] = (),
    removable: Iterable[int] | None = None,
    method: str = "auto",
    time_limit: float | None = None,
    node_limit: int | None = None,
    tie_tol: float = 1e-9,
    seed: int = 0,
    bound: str = "both",
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> Ranking:
    """The K lowest states of  min x^T H x + c^T x  s.t. sum x = M, x binary, with constraints.

    Parameters
    ----------
    H : array_like, shape (N, N)
        Symmetric PSD matrix (the block Hessian / empirical Fisher).
    n_remove : int
        M, blocks to remove (forced removals included).
    k : int
        Number of lowest states to return (all feasible states if there are fewer).
    linear : array_like, shape (N,), optional
        Linear term c.
    keep, force_remove : iterable of int
        Blocks that must stay / must be removed.
    removable : iterable of int, optional
        Only these blocks may be removed (None: all).
    method : {"auto", "exact", "enumerate", "tabu", "tempering"}
        "exact": K-best branch-and-bound (anytime under a budget); "enumerate": compiled
        exhaustive enumeration; "tabu" / "tempering": heuristics (no proof, root bound reported);
        "auto": enumeration when C(n, m) <= AUTO_ENUMERATE_MAX, else branch-and-bound with
        `time_limit` (default AUTO_TIME_LIMIT seconds when no budget is given).
    time_limit : float, optional
        Seconds for the search (branch-and-bound, heuristics). When the branch-and-bound stops on
        it, the result has exact=False, a certified `lower_bound` and info["gap"].
    node_limit : int, optional
        Branch-and-bound node budget.
    tie_tol : float
        Energies within tie_tol * info["energy_scale"] (= M max_i(|H_ii| + |c_i|)) are ties:
        listed in lexicographic order of the removed indices, marked `tied_with_previous`.
    seed : int
        Seed of the heuristics (results of "exact"/"enumerate" do not depend on it).
    bound : {"both", "row", "qp"}
        Branch-and-bound lower bounds.
    progress : callable, optional
        Branch-and-bound only: called about every 0.5 s with {"nodes", "lower_bound" (current
        certificate), "cutoff" (K-th energy found), "elapsed_s"} (e.g. to drive a progress bar).

    Returns
    -------
    Ranking
        method "cbo", candidates sorted by energy (score), exact / lower_bound / info as documented
        in `cboprune.core.ranking`; info["solver"] names the algorithm that ran.

    Raises
    ------
    ValueError
        Invalid matrix, indices, counts, method or budget.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be > 0 seconds, got {time_limit!r}")
    if node_limit is not None and int(node_limit) < 1:
        raise ValueError(f"node_limit must be >= 1, got {node_limit!r}")
    if not tie_tol >= 0:
        raise ValueError(f"tie_tol must be >= 0, got {tie_tol!r}")
    p = make_problem(H, n_remove, k, linear=linear, keep=keep, force_remove=force_remove,
                     removable=removable)
    _warn_if_not_psd(p)
    t0 = time.perf_counter()
    chosen = method
    if method == "auto":
        chosen = "enumerate" if p.n_feasible <= AUTO_ENUMERATE_MAX else "exact"
        if chosen == "exact" and time_limit is None and node_limit is None:
            time_limit = AUTO_TIME_LIMIT
    trivial = p.m == 0 or p.m == p.n_free
    if chosen == "enumerate" or (chosen == "exact" and trivial):
        sets, visited, _ = run_enumeration(p, k)
        info = {"solver": "enumerate", "states_visited": visited}
        exact, lb = True, None
    elif chosen == "exact":
        res = run_bnb(p, k, time_limit=time_limit, node_limit=node_limit, tie_tol=tie_tol,
                      seed=seed, bound=bound, progress=progress)
        sets = res.sets
        info = {"solver": "branch-and-bound", **res.info}
        exact = res.complete
        lb = None if res.complete else res.open_bound
        if not exact:
            logger.warning("branch-and-bound stopped on its budget after %d nodes: the list is "
                           "not proven exact (see info['gap'])", res.info["nodes"])
    else:
        runner = run_tabu if chosen == "tabu" else run_tempering
        sets, hinfo = runner(p, k, seed=seed, time_limit=time_limit)
        info = {"solver": chosen, **hinfo}
        exact = len(set(sets)) >= p.n_feasible
        lb = None if exact else root_lower_bound(p)
    info["method_requested"] = method
    info["time_s"] = time.perf_counter() - t0
    rk = finalize(p, sets, tie_tol=tie_tol, exact=exact, lower_bound=lb, info=info)
    logger.info("solved N=%d M=%d K=%d with %s in %.3fs (exact=%s, gap=%s)", p.n_blocks,
                p.n_remove, p.k, info["solver"], info["time_s"], exact, rk.info.get("gap"))
    return rk


def _warn_if_not_psd(p: Problem) -> None:
    if p.n_free == 0:
        return
    Hff = p.H[np.ix_(p.free, p.free)]
    lam = np.linalg.eigvalsh(Hff)
    if lam[0] < -1e-8 * max(abs(lam[-1]), 1e-300):
        # normal for the measured and hybrid energies (interactions without a Gram structure): not a warning
        logger.info("H is not positive semidefinite on the free blocks (lambda_min = %.3g); "
                    "the solvers stay exact, the relaxation bound uses a larger shift", lam[0])
