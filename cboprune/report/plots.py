"""PNG figures (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cboprune.core.ranking import Ranking


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def removal_frequency(ranking: Ranking) -> np.ndarray:
    """[N] fraction of the ranking's candidates that remove each block."""
    counts = np.zeros(ranking.n_blocks)
    for cand in ranking.candidates:
        counts[list(cand.removed)] += 1
    return counts / max(len(ranking.candidates), 1)


def plot_removal_frequency(rankings: Sequence[Ranking], path: str | Path,
                           block_kinds: Sequence[str] | None = None) -> Path:
    """How often each block is removed among the K lowest states, one panel per M (paper Fig. 3)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(rankings), 1, figsize=(max(6, 0.28 * rankings[0].n_blocks + 2),
                                                          2.2 * len(rankings) + 0.6), squeeze=False)
    kinds = list(block_kinds or [])
    palette = {k: f"C{i}" for i, k in enumerate(dict.fromkeys(kinds))}
    for ax, ranking in zip(axes[:, 0], rankings):
        freq = removal_frequency(ranking)
        colors = [palette[k] for k in kinds] if kinds else "C0"
        ax.bar(np.arange(ranking.n_blocks), freq, color=colors)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("fraction")
        ax.set_title(f"{ranking.method}: M = {ranking.n_remove}, {len(ranking.candidates)} lowest states",
                     fontsize=9)
        ax.set_xticks(np.arange(ranking.n_blocks))
        ax.tick_params(axis="x", labelsize=7)
    axes[-1, 0].set_xlabel("block index")
    if len(palette) > 1:
        from matplotlib.patches import Patch

        axes[0, 0].legend(handles=[Patch(color=c, label=k) for k, c in palette.items()], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_hessian(H: np.ndarray, path: str | Path, title: str = "H = AᵀA / m") -> Path:
    """Heatmap of H with a symmetric color scale (couplings can have either sign)."""
    plt = _pyplot()
    n = H.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    lim = float(np.abs(H).max()) or 1.0
    im = ax.imshow(H, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(title)
    ax.set_xlabel("block j")
    ax.set_ylabel("block i")
    step = max(1, n // 16)
    ax.set_xticks(range(0, n, step))
    ax.set_yticks(range(0, n, step))
    fig.colorbar(im, ax=ax, shrink=0.85)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
