"""Relaxation shifts and root bounds of the branch-and-bound (numpy / scipy, no search).

On binaries y_j^2 = y_j, so for any diagonal s the energy of a completion equals
y^T (W + diag s) y + (u - s + 2 g)^T y. When W + diag(s) is PSD on {sum y = 0} the minimum of that
quadratic over {0 <= y <= 1, sum y = r} is a convex lower bound (docs/solver.md, "Bounds").
This module builds the shift s:

- `relaxation_shifts`: two closed forms (uniform eigenvalue shift, diagonal-scaled shift);
- `optimize_shift`: ascent on the root bound over the boundary of the PSD set (a QCR-type,
  SDP-like diagonal), anytime and time-capped; any iterate is a valid shift;
- `depth_corrections`: per-depth uniform tightening lam_d >= 0 for the suffix free sets of the
  static order (principal submatrices are "more PSD" than the whole);
- `dnn_surrogate`: a nonnegative matrix N from the doubly non-negative (DNN) relaxation, with
  x^T W x >= x^T (W - N) x on every state (x >= 0), so bounding with W - N stays valid and the
  diagonal-shift bound of W - N reaches the DNN bound, much tighter than the diagonal alone.

Every function here reads the quadratic through `p.W` only, so `bound_view(p, W - N)` bounds the
surrogate with the same code.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.linalg

from cboprune.solvers import _kernels as kn
from cboprune.solvers._problem import Problem

#: relative safety margin on every eigenvalue used to certify PSD-ness
EIG_MARGIN = 1e-7


def _safe(lam: float, scale: float) -> float:
    """An eigenvalue pushed down by a safety margin (the shift stays PSD under rounding)."""
    return lam - abs(lam) * EIG_MARGIN - 1e-12 * max(scale, 1e-300)


def _basis(n: int) -> np.ndarray:
    """Orthonormal basis (n, n-1) of the subspace {sum y = 0}."""
    return scipy.linalg.null_space(np.ones((1, n)))


def relaxation_shifts(p: Problem) -> dict[str, np.ndarray]:
    """Closed-form shifts s (n,) with W + diag(s) PSD on the subspace {sum y = 0}.

    "uniform": s = h - mu, mu = lambda_min of H_FF on 1^perp (negative when H is indefinite);
    "scaled": s = h (1 - mu'), mu' the smallest generalized eigenvalue of (H_FF, diag h) on
    1^perp (helps when block scales are uneven). Smaller s gives a tighter bound (the bound is
    concave in s with gradient y^2 - y <= 0), so s = h ("none") is never better than "uniform".
    """
    n = p.n_free
    h = np.diag(p.H)[p.free].copy()
    Hff = p.W + np.diag(h)  # the free block of H (W is its off-diagonal part, or a surrogate's)
    if n < 2:
        return {"none": h.copy()}  # y is fixed by sum y = r: any shift is exact
    out: dict[str, np.ndarray] = {}
    P = _basis(n)
    A = P.T @ Hff @ P
    A = 0.5 * (A + A.T)
    hmax = float(np.max(np.abs(h)))
    try:
        mu = float(scipy.linalg.eigvalsh(A, subset_by_index=[0, 0])[0])
        out["uniform"] = h - _safe(mu, hmax)
    except (np.linalg.LinAlgError, ValueError):  # pragma: no cover - LAPACK failure
        lam = float(np.linalg.eigvalsh(Hff)[0])
        out["uniform"] = h - _safe(lam, hmax)
    if np.all(h > 0):
        B = P.T @ np.diag(h) @ P
        B = 0.5 * (B + B.T)
        try:
            mu2 = float(scipy.linalg.eigh(A, B, eigvals_only=True, subset_by_index=[0, 0])[0])
            mu2 = mu2 - abs(mu2) * EIG_MARGIN - 1e-12
            out["scaled"] = h * (1.0 - mu2)
        except (np.linalg.LinAlgError, ValueError):  # pragma: no cover
            pass
    return out


def root_qp(p: Problem, s: np.ndarray, iters: int = 3000,
            y0: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Root relaxation with shift s solved to tolerance: (certified bound, y (n,))."""
    n = p.n_free
    Q = np.ascontiguousarray(p.W + np.diag(s))
    b = p.u - s
    F = np.arange(n, dtype=np.int64)
    y = np.full(n, p.m / n) if y0 is None else y0.copy()
    work = np.zeros((5, n))
    tol = 1e-10 * p.scale
    lb, _, _ = kn.qp_bound(Q, b, F, n, p.m, y, np.inf, -np.inf, iters, tol, 0.0, work)
    return float(lb), y


def row_values(p: Problem) -> np.ndarray:
    """Root row-bound values v_j = u_j + sum of the m-1 smallest W_jk (n,)."""
    n, m = p.n_free, p.m
    v = p.u.copy()
    if m > 1:
        for j in range(n):
            row = np.delete(p.W[j], j)
            v[j] += np.sort(row)[: m - 1].sum()
    return v


def optimize_shift(
    p: Problem, s0: np.ndarray, y0: np.ndarray, *, time_budget: float, max_iter: int = 400,
) -> tuple[np.ndarray, float, np.ndarray, int]:
    """Raise the root bound by moving the shift along the boundary of the PSD set.

    Parametrization s(t) = t - lambda_min(P^T (W + diag t) P) 1 keeps every iterate PSD on
    1^perp (a uniform shift moves every eigenvalue on 1^perp equally). The root bound L(s) is
    concave with supergradient y*^2 - y* (y* the relaxation optimum), so t moves along
    grad_t = g - (1^T g) w, w = squared eigenvector weights (soft-min over the lowest
    eigenvalues where they cluster, which is where the optimum drives them), constant step (a
    subgradient method). Any iterate is valid; the best is returned: (s, bound, y, iterations).
    """
    n = p.n_free
    t_end = time.perf_counter() + time_budget
    P = _basis(n)
    PWP = P.T @ p.W @ P
    scale = float(np.max(np.abs(s0))) or 1.0
    best_s, (best_lb, best_y) = s0, root_qp(p, s0, y0=y0)
    t, y, lr, it = s0.copy(), best_y.copy(), None, 0
    work = np.zeros((5, n))
    F = np.arange(n, dtype=np.int64)
    while it < max_iter and time.perf_counter() < t_end:
        it += 1
        A = PWP + P.T @ (t[:, None] * P)
        lam, V = np.linalg.eigh(0.5 * (A + A.T))
        s = t - _safe(float(lam[0]), scale)
        Q = np.ascontiguousarray(p.W + np.diag(s))
        lb, _, _ = kn.qp_bound(Q, p.u - s, F, n, p.m, y, np.inf, -np.inf, 100, 0.0, 0.0, work)
        if lb > best_lb:
            best_s, best_lb, best_y = s, float(lb), y.copy()
        g = y * y - y
        # soft-min over the eigenvalues close to the smallest one (a cluster forms at the optimum)
        tau = max(1e-3 * float(lam[min(5, lam.size - 1)] - lam[0]), 1e-12 * scale)
        if not tau > 0:  # a zero (or all-tied) quadratic: no direction to move along
            break
        wts = np.exp(-(lam - lam[0]) / tau)
        wts /= wts.sum()
        grad = g - g.sum() * (((P @ V) ** 2) @ wts)
        gmax = float(np.max(np.abs(grad)))
        if gmax <= 1e-15:
            break
        if lr is None:  # constant step (a subgradient method; the best iterate is kept)
            lr = 0.05 * float(np.mean(np.abs(s))) / gmax
        if not lr > 0 or not np.isfinite(lr):
            break
        t = s + lr * grad
    # final, converged bound of the best shift (certified at any iterate count)
    lb, y = root_qp(p, best_s, y0=best_y)
    return best_s, max(lb, best_lb), y, it  # both are certified bounds of best_s


def _min_eig_perp(A: np.ndarray) -> float:
    """Smallest eigenvalue of the symmetric A restricted to {sum y = 0} (no basis needed).

    J A J (J = I - 11^T/n) has that spectrum plus 0 on the direction 1; adding c 11^T/n with c
    above the spectrum moves that one eigenvalue out of the way.
    """
    nf = A.shape[0]
    mean_row = A.mean(axis=1)
    JAJ = A - mean_row[:, None] - mean_row[None, :] + mean_row.mean()
    c = 2.0 * float(np.abs(A).sum(axis=1).max())  # >= ||A|| >= the smallest eigenvalue sought
    return float(scipy.linalg.eigvalsh(JAJ + c / nf, subset_by_index=[0, 0])[0])


def depth_corrections(p: Problem, s: np.ndarray, order: np.ndarray, every: int = 1) -> np.ndarray:
    """lam (n + 1,): lam[d] >= 0 with W + diag(s) - lam[d] I PSD on 1^perp of order[d:].

    The free set at depth d of the static order is the suffix order[d:]; its principal
    submatrix has a larger smallest eigenvalue on 1^perp (interlacing), which tightens the
    relaxation of every node at that depth for free: lam[d] (sum y - sum y^2) >= 0 is added.
    With `every` > 1 only every `every`-th depth is computed and the depths in between reuse
    the value above them (valid by the same interlacing: it only grows with d).
    """
    n = p.n_free
    lam = np.zeros(n + 1)
    Q = p.W + np.diag(s)
    scale = float(np.max(np.abs(s))) or 1.0
    cur = 0.0
    for d in range(n - 2):
        if d % max(1, every) == 0:
            idx = order[d:]
            cur = max(cur, _safe(_min_eig_perp(Q[np.ix_(idx, idx)]), scale))
        lam[d] = cur
    return lam


def bound_view(p: Problem, W_bound: np.ndarray) -> Problem:
    """`p` with `W_bound` as the quadratic the bounds read (energies keep using `p.W`)."""
    import dataclasses

    return dataclasses.replace(p, W=np.ascontiguousarray(W_bound))


def dnn_surrogate(p: Problem, *, time_budget: float, y0: np.ndarray | None = None,
                  tolerances: tuple[float, ...] = (1e-4, 1e-5)):
    """(W - N, its shift s, certified root bound, root solution y, info) from the doubly
    non-negative relaxation, or None.

    DNN relaxation of min x^T W x + u^T x, sum x = m, x binary: Y = [1 x^T; x X] PSD, diag X = x,
    X 1 = m x, X >= 0, minimize <W, X> + u^T x (solved approximately by SCS through cvxpy within
    `time_budget` seconds). Its dual multiplier N >= 0 of X >= 0 gives the surrogate:
    x^T N x >= 0 for every x >= 0, so x^T W x >= x^T (W - N) x on all states and any bound
    computed with W - N is a valid bound of the real energy, whatever the solver's accuracy (N is
    only symmetrized, clipped at 0 and its diagonal zeroed). The multiplier of diag X = x, made
    PSD on {sum y = 0} by the exact eigenvalue correction, is the matching shift: with both at
    the dual optimum the root relaxation of W - N attains the DNN bound (strong duality), against
    the diagonal shift's SDP bound for W alone. The solve is repeated, warm-started, at each
    tighter tolerance while the time left is at least twice the last solve's; the surrogate with
    the best certified root bound is returned. None when cvxpy / SCS are missing or fail.
    """
    import logging
    import warnings

    log = logging.getLogger(__name__)
    n, m = p.n_free, p.m
    if n < 3 or not 1 <= m <= n - 1:
        return None
    try:
        import cvxpy as cp
    except ImportError:  # pragma: no cover - a declared dependency; degrade, do not fail
        log.info("cvxpy is not installed: the branch-and-bound uses the diagonal shift only")
        return None
    # SCS's tolerances are absolute: unit mean unary cost puts the objective near m whatever the
    # loss scale (a scale set by the largest entry made the gradient-like case inaccurate)
    scale = float(np.mean(np.abs(p.u))) or float(np.max(np.abs(p.W))) or 1.0
    t0 = time.perf_counter()
    t_end = t0 + float(time_budget)
    Y = cp.Variable((n + 1, n + 1), symmetric=True)
    x, X = Y[0, 1:], Y[1:, 1:]
    nonneg = X >= 0
    diagonal = cp.diag(X) == x
    problem = cp.Problem(cp.Minimize(cp.trace((p.W / scale) @ X) + (p.u / scale) @ x),
                         [Y >> 0, Y[0, 0] == 1, diagonal, cp.sum(X, axis=1) == m * x, cp.sum(x) == m, nonneg])
    best, solves = None, []
    for i, eps in enumerate(tolerances):
        t1 = time.perf_counter()
        if i and t_end - t1 < 2.0 * solves[-1]["seconds"]:
            break
        try:
            with warnings.catch_warnings():  # "may be inaccurate": the status goes into the info
                warnings.simplefilter("ignore", UserWarning)
                problem.solve(solver="SCS", warm_start=i > 0, eps_abs=eps, eps_rel=eps,
                              time_limit_secs=max(t_end - t1, 0.5))
        except (cp.error.SolverError, ValueError, ArithmeticError) as exc:  # pragma: no cover
            log.info("DNN relaxation failed (%s): the branch-and-bound uses the diagonal shift only", exc)
            break
        if nonneg.dual_value is None or diagonal.dual_value is None:
            break
        N = np.asarray(nonneg.dual_value, dtype=np.float64) * scale
        N = np.maximum(0.5 * (N + N.T), 0.0)
        np.fill_diagonal(N, 0.0)
        W_bound = p.W - N
        s = np.asarray(diagonal.dual_value, dtype=np.float64).reshape(n) * scale
        s = s - _safe(_min_eig_perp(W_bound + np.diag(s)), float(np.max(np.abs(s))) or 1.0)  # PSD on 1^perp
        lb, y = root_qp(bound_view(p, W_bound), s, y0=y0)
        solves.append({"eps": eps, "status": problem.status, "seconds": round(time.perf_counter() - t1, 3),
                       "value": None if problem.value is None else float(problem.value) * scale,
                       "root_bound": lb})
        if best is None or lb > best[2]:
            best = (W_bound, s, lb, y)
    if best is None:
        return None
    return (*best, {"seconds": round(time.perf_counter() - t0, 3), "solves": solves})
