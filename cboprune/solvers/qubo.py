"""QUBO export of the constrained problem for external (classical or quantum) solvers.

    Q(x) = x^T H x + c^T x + P (sum x - M)^2        over x in {0,1}^n (free blocks only)

Penalty rule (docs/solver.md): let E_ub be the energy of the K-th lowest feasible state found by
tabu search (an upper bound on the true K-th lowest feasible energy E_K) and L a lower bound of the
*unconstrained* objective over {0,1}^n,

    L = max( sum_j min(0, c_j)                                  if H is PSD (x^T H x >= 0),
             sum_j min(0, H_jj + c_j) + sum_{j<k} min(0, 2 H_jk) ).

With P > E_ub - L, every infeasible x (|sum x - M| >= 1) has Q(x) >= L + P > E_ub >= E_K, while
Q = f on feasible x: the K lowest QUBO states are exactly the K lowest feasible states, in order
(K = 1: the constrained optimum is the QUBO optimum). We use P = (E_ub - L) * (1 + 1e-3) + tiny.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cboprune.solvers._problem import Problem, energy, make_problem
from cboprune.solvers.heuristics import run_tabu

logger = logging.getLogger(__name__)

QUBO_FORMAT = "cboprune-qubo/1"


@dataclass
class Qubo:
    """An upper-triangular QUBO: Q(x) = sum_{i<=j} Q_ij x_i x_j + offset over x in {0,1}^n.

    matrix: (n, n) upper-triangular coefficients (diagonal = linear terms);
    variables: (n,) original block index of each QUBO variable (the free blocks);
    offset: constant (penalty P M^2 and the energy of forced-removed blocks);
    penalty: P; n_remove: M of the free part (blocks still to choose); forced: forced-removed blocks.
    """

    matrix: np.ndarray
    offset: float
    penalty: float
    variables: tuple[int, ...]
    n_remove: int
    n_blocks: int
    forced: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def energy(self, x: Any) -> float:
        """Q(x) for x (n,) binary over the QUBO variables."""
        xv = np.asarray(x, dtype=np.float64).reshape(-1)
        if xv.shape != (self.matrix.shape[0],):
            raise ValueError(f"x must have shape ({self.matrix.shape[0]},), got {xv.shape}")
        return float(xv @ self.matrix @ xv + self.offset)

    def decode(self, x: Any) -> tuple[int, ...]:
        """Removed original block indices of a QUBO sample (forced ones included)."""
        xv = np.asarray(x).reshape(-1)
        return tuple(sorted([self.variables[i] for i in np.flatnonzero(xv)] + list(self.forced)))

    def terms(self) -> tuple[dict[int, float], dict[tuple[int, int], float]]:
        """Linear {i: Q_ii} and quadratic {(i, j): Q_ij, i < j} coefficients (nonzero only)."""
        n = self.matrix.shape[0]
        lin = {i: float(self.matrix[i, i]) for i in range(n)}
        iu, ju = np.triu_indices(n, 1)
        vals = self.matrix[iu, ju]
        quad = {(int(a), int(b)): float(v) for a, b, v in zip(iu, ju, vals, strict=True) if v != 0}
        return lin, quad

    def to_bqm(self) -> Any:
        """A `dimod.BinaryQuadraticModel` (BINARY) with the same energies (needs dimod)."""
        try:
            import dimod
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_bqm needs the optional package dimod: pip install dimod") from exc
        lin, quad = self.terms()
        return dimod.BinaryQuadraticModel(lin, quad, self.offset, dimod.BINARY)

    def to_dict(self) -> dict[str, Any]:
        lin, quad = self.terms()
        return {
            "format": QUBO_FORMAT,
            "objective": "sum_i linear[i] x_i + sum_{i<j} quadratic[i,j] x_i x_j + offset",
            "n_variables": int(self.matrix.shape[0]),
            "variables": list(self.variables),
            "linear": [lin[i] for i in range(self.matrix.shape[0])],
            "quadratic": [[i, j, v] for (i, j), v in quad.items()],
            "offset": self.offset,
            "penalty": self.penalty,
            "n_remove": self.n_remove,
            "n_blocks": self.n_blocks,
            "forced_removed": list(self.forced),
            "meta": self.meta,
        }

    def write_json(self, path: str | os.PathLike[str]) -> None:
        """Plain JSON: linear list, [i, j, value] quadratic triples, offset, variable map."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)

    def write_qubo(self, path: str | os.PathLike[str]) -> None:
        """qbsolv `.qubo` text format: `p qubo 0 n n_diag n_couplers`, then `i i v` / `i j v`.

        The offset and the variable map go into `c` comment lines (the format has no offset).
        """
        lin, quad = self.terms()
        n = self.matrix.shape[0]
        diag = {i: v for i, v in lin.items() if v != 0}
        lines = [
            f"c cboprune QUBO: remove {self.n_remove} of variables 0..{n - 1}, penalty {self.penalty!r}",
            f"c offset {self.offset!r}",
            "c variables " + " ".join(str(v) for v in self.variables),
            "c forced_removed " + " ".join(str(v) for v in self.forced),
            f"p qubo 0 {n} {len(diag)} {len(quad)}",
        ]
        lines += [f"{i} {i} {v!r}" for i, v in diag.items()]
        lines += [f"{i} {j} {v!r}" for (i, j), v in quad.items()]
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    @classmethod
    def read_json(cls, path: str | os.PathLike[str]) -> Qubo:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict) or d.get("format") != QUBO_FORMAT:
            raise ValueError(f"{path}: not a {QUBO_FORMAT} file")
        try:
            n = int(d["n_variables"])
            linear = [float(v) for v in d["linear"]]
            if len(linear) != n:  # numpy would broadcast a short list silently
                raise ValueError(f"{len(linear)} linear terms for {n} variables")
            Q = np.zeros((n, n))
            Q[np.arange(n), np.arange(n)] = linear
            for i, j, v in d["quadratic"]:
                if not (0 <= int(i) < int(j) < n):
                    raise IndexError(f"quadratic term ({i}, {j}) outside the upper triangle of {n} variables")
                Q[int(i), int(j)] = float(v)
            return cls(matrix=Q, offset=float(d["offset"]), penalty=float(d["penalty"]),
                       variables=tuple(int(v) for v in d["variables"]), n_remove=int(d["n_remove"]),
                       n_blocks=int(d["n_blocks"]), forced=tuple(int(v) for v in d["forced_removed"]),
                       meta=dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"{path}: malformed {QUBO_FORMAT} file ({type(exc).__name__}: {exc})") from None


def unconstrained_lower_bound(p: Problem) -> float:
    """A lower bound of x^T H x + c^T x over all x in {0,1}^n (free part, forced terms in u)."""
    n = p.n_free
    Hff = p.H[np.ix_(p.free, p.free)]
    lin = p.u - np.diag(Hff)  # c_j + forced couplings
    generic = float(np.minimum(0.0, p.u).sum() + np.minimum(0.0, 2.0 * np.triu(p.W, 1)).sum())
    lb = generic
    if n and np.linalg.eigvalsh(Hff)[0] >= -1e-12 * max(float(np.abs(Hff).max()), 1e-300):
        lb = max(lb, float(np.minimum(0.0, lin).sum()))
    return lb + p.const


def to_qubo(
    H: Any,
    n_remove: int,
    *,
    linear: Any = None,
    keep: Iterable[int] = (),
    force_remove: Iterable[int] = (),
    removable: Iterable[int] | None = None,
    penalty: float | None = None,
    k: int = 1,
    seed: int = 0,
) -> Qubo:
    """Penalty QUBO whose K lowest states are the K lowest feasible states of the CBO problem.

    Parameters
    ----------
    H : (N, N) symmetric PSD array; n_remove : M; linear : (N,) optional c
    keep, force_remove, removable : constraints (folded in: the QUBO has one variable per free block)
    penalty : float, optional
        P; if given it is checked against the rule and a warning is logged when it is not provably
        large enough. Default: the rule of the module docstring.
    k : int
        Number of lowest states the penalty must preserve (1: the ground state).

    Returns
    -------
    Qubo with Q(x) = f(x) for feasible x and Q(x) > E_K for infeasible x.
    """
    p = make_problem(H, n_remove, k, linear=linear, keep=keep, force_remove=force_remove,
                     removable=removable)
    n, m = p.n_free, p.m
    sets, _ = run_tabu(p, k, seed=seed)
    cl = p.c if p.has_linear else None
    e_ub = sorted(energy(p.H, s, cl) for s in sets)[min(k, len(sets)) - 1]
    low = unconstrained_lower_bound(p)
    need = e_ub - low
    rule = need * (1.0 + 1e-3) + 1e-12 * max(p.scale, 1e-300)
    if penalty is None:
        P = max(rule, 0.0) + np.finfo(float).tiny
    else:
        P = float(penalty)
        if not P > need:
            logger.warning("penalty %.6g is not provably large enough (rule: P > %.6g)", P, need)
    # x^T H_ff x + lin^T x + P (sum x - m)^2 + const, lin = u - diag(H_ff)
    Qm = np.triu(2.0 * p.W, 1)
    Qm[np.diag_indices(n)] = p.u + P * (1.0 - 2.0 * m)
    iu = np.triu_indices(n, 1)
    Qm[iu] += 2.0 * P
    offset = P * m * m + p.const
    meta = {"rule": "P > E_ub(K) - L", "E_ub": e_ub, "L": low, "k": int(k)}
    return Qubo(matrix=Qm, offset=float(offset), penalty=float(P),
                variables=tuple(int(v) for v in p.free), n_remove=m, n_blocks=p.n_blocks,
                forced=p.forced, meta=meta)
