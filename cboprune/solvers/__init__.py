"""Pure CBO solvers: (H, M, K, constraints) -> the K lowest states as a `Ranking`.

    solve(H, n_remove, k, ...)                 exact K-best branch-and-bound / enumeration / heuristics
    enumerate_exhaustive(H, n_remove, k, ...)  compiled reference enumeration
    to_qubo(H, n_remove, ...)                  penalty QUBO for external solvers (JSON, .qubo, dimod)

No model or file access here except the explicit QUBO writers. See docs/solver.md.
"""

from __future__ import annotations

from cboprune.solvers._problem import energy, make_problem
from cboprune.solvers.api import METHODS, root_lower_bound, solve
from cboprune.solvers.exhaustive import enumerate_exhaustive
from cboprune.solvers.qubo import Qubo, to_qubo

__all__ = [
    "METHODS",
    "Qubo",
    "energy",
    "enumerate_exhaustive",
    "make_problem",
    "root_lower_bound",
    "solve",
    "to_qubo",
]
