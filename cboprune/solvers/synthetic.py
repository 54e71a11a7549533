"""Synthetic CBO matrices for tests and benchmarks (no model needed).

`gradient_gram` imitates H = A^T A / m from per-sample gate gradients: neighbouring blocks are
correlated (AR(1) along depth plus a shared low-rank component), block scales are uneven (large at
the first and last blocks, log-normal spread elsewhere) and samples are heavy-tailed.
`wishart` is the plain Gaussian Gram matrix.
"""

from __future__ import annotations

import numpy as np


def wishart(n: int, m: int, rng: np.random.Generator | int = 0) -> np.ndarray:
    """H = A^T A / m with A (m, n) i.i.d. standard normal. Returns (n, n)."""
    rng = np.random.default_rng(rng)
    A = rng.standard_normal((m, n))
    return A.T @ A / m


def gradient_gram(
    n: int,
    m: int = 128,
    rng: np.random.Generator | int = 0,
    *,
    rho: float = 0.6,
    rank: int = 3,
    scale_sigma: float = 0.7,
) -> np.ndarray:
    """Per-sample-gradient-like Gram matrix H = A^T A / m, (n, n), PSD, uneven scales.

    Parameters
    ----------
    n : blocks; m : samples (rows of A)
    rho : AR(1) correlation between neighbouring blocks
    rank : rank of the component shared by all blocks
    scale_sigma : log-normal spread of the block scales
    """
    rng = np.random.default_rng(rng)
    idx = np.arange(n)
    C = rho ** np.abs(idx[:, None] - idx[None, :])
    F = rng.standard_normal((n, rank)) / np.sqrt(rank)
    C = 0.7 * C + 0.3 * (F @ F.T)
    L = np.linalg.cholesky(C + 1e-9 * np.eye(n))
    Z = rng.standard_normal((m, n)) @ L.T  # (m, n) correlated across blocks
    w = np.sqrt(rng.chisquare(3, size=m) / 3.0)  # heavy-tailed per-sample magnitude
    depth = 1.0 + 4.0 * np.exp(-idx / 1.5) + 2.0 * np.exp(-(n - 1 - idx) / 1.5)
    scale = depth * np.exp(scale_sigma * rng.standard_normal(n))
    A = (w[:, None] * Z) * scale[None, :]
    return A.T @ A / m
