"""Criteria from block input/output hidden states: Block Influence (one-shot and iterative),
angular distance of a contiguous window, and the norm ratio.

All statistics come from forward hooks on the decoder layers, i.e. the exact input and output of
each block (`output_hidden_states` would give the final-normed state as its last entry).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
import torch

from cboprune.baselines._common import top_m_ranking
from cboprune.models.block_stats import BlockStats, collect_block_stats
from cboprune.data.calibration import CalibrationSet
from cboprune.models.gating import GateManager
from cboprune.models.masked import n_blocks
from cboprune.models.architectures import blocks
from cboprune.core.ranking import Candidate, Ranking, check_n_remove

log = logging.getLogger(__name__)

BI_REFERENCE = "Men et al., ShortGPT (arXiv:2403.03853), Block Influence"
ANGULAR_REFERENCE = "Gromov et al., The Unreasonable Ineffectiveness of the Deeper Layers (arXiv:2403.17887)"
NORM_RATIO_REFERENCE = "Mistral AI, Ministral 3 (arXiv:2601.08584), layer pruning by norm ratio"


def block_influence_scores(stats: BlockStats) -> np.ndarray:
    """BI_i = 1 - mean over calibration tokens of cos(x_i, x_{i+1}) (x_i: block i's input)."""
    return 1.0 - stats.cos_mean


def block_influence(model: torch.nn.Module, calibration: CalibrationSet, n_remove: int, *, top: int = 1,
                    batch_size: int = 8, keep: Iterable[int] = (), stats: BlockStats | None = None) -> Ranking:
    """ShortGPT one-shot: remove the M blocks with the lowest Block Influence.

    Candidate score: the sum of the removed blocks' BI. `stats` reuses a pass of
    `collect_block_stats` (one pass serves BI, angular distance and norm ratio).
    """
    stats = stats or collect_block_stats(model, calibration, batch_size=batch_size)
    return top_m_ranking("bi", block_influence_scores(stats), n_remove, top, keep=keep,
                         info={"criterion": "1 - mean token cos(block input, block output)", "reference": BI_REFERENCE,
                               "n_tokens": stats.n_tokens, "forward_passes": 1, "seconds": stats.seconds})


def block_influence_iterative(model: torch.nn.Module, calibration: CalibrationSet, n_remove: int, *,
                              batch_size: int = 8, keep: Iterable[int] = (),
                              first_stats: BlockStats | None = None) -> Ranking:
    """ShortGPT applied iteratively (the CBO paper's BI baseline): remove the block with the lowest
    BI, recompute every BI on the model without it, repeat M times.

    info["order"]: original indices in removal order; info["order_shrunk"]: the same blocks as
    indices of the current, already-shrunk model at the time of each removal (the paper's Table 2
    notation); info["step_scores"]: the BI of each removed block when it was removed. Candidate
    score: the sum of those step scores. The removal order is a prefix-consistent path, so the
    ranking for a smaller M is the prefix of a larger one (`info["order"][:M]`).
    """
    n = n_blocks(model)
    keep = set(keep)
    check_n_remove(n_remove, n, len(keep))
    start = time.perf_counter()
    removed: list[int] = []
    shrunk: list[int] = []
    step_scores: list[float] = []
    all_scores: list[list[float]] = []
    gates = GateManager(model, blocks(model))
    try:
        for step in range(n_remove):
            if step == 0 and first_stats is not None and not first_stats.removed:
                stats = first_stats
            else:
                stats = collect_block_stats(model, calibration, batch_size=batch_size, removed=removed, gates=gates)
            bi = block_influence_scores(stats)
            candidates = [i for i in range(n) if i not in removed and i not in keep]
            pick = min(candidates, key=lambda i: (bi[i], i))
            shrunk.append(pick - sum(1 for r in removed if r < pick))
            removed.append(pick)
            step_scores.append(float(bi[pick]))
            all_scores.append([float(bi[i]) if i not in removed[:-1] else float("nan") for i in range(n)])
            log.info("bi-iter step %d: remove block %d (index %d of the current model), BI %.5f",
                     step + 1, pick, shrunk[-1], bi[pick])
    finally:
        gates.remove()
    cand = Candidate(removed=tuple(sorted(removed)), score=float(sum(step_scores)), rank=0)
    return Ranking(method="bi-iter", n_blocks=n, n_remove=n_remove, candidates=[cand],
                   info={"criterion": "Block Influence, recomputed after each removal", "reference": BI_REFERENCE,
                         "order": removed, "order_shrunk": shrunk, "step_scores": step_scores,
                         "step_block_scores": all_scores, "keep": sorted(keep),
                         "forward_passes": n_remove - (first_stats is not None),
                         "seconds": round(time.perf_counter() - start, 2)})


def angular_distances(stats: BlockStats, n_remove: int) -> np.ndarray:
    """d(l) = mean over samples of arccos(cos(x_l, x_{l+n})) / pi at each sample's last real token,
    for every window start l = 0..N-n (x_l: block l's input, x_N: the last block's output)."""
    x = torch.from_numpy(stats.last_token).double()  # [N+1, m, D]
    n = stats.n_blocks
    out = np.empty(n - n_remove + 1)
    for start in range(n - n_remove + 1):
        cos = torch.nn.functional.cosine_similarity(x[start], x[start + n_remove], dim=-1).clamp(-1.0, 1.0)
        out[start] = float((torch.arccos(cos) / np.pi).mean())
    return out


def angular_distance(model: torch.nn.Module, calibration: CalibrationSet, n_remove: int, *, top: int = 1,
                     batch_size: int = 8, keep: Iterable[int] = (), stats: BlockStats | None = None) -> Ranking:
    """Gromov et al.: remove the contiguous window of n = M blocks whose input and output are
    closest in angle at the last token. Candidates: windows by increasing distance (score = d)."""
    n = n_blocks(model)
    keep = set(keep)
    check_n_remove(n_remove, n, len(keep))
    stats = stats or collect_block_stats(model, calibration, batch_size=batch_size)
    d = angular_distances(stats, n_remove)
    starts = [s for s in np.argsort(d, kind="stable") if not keep & set(range(s, s + n_remove))]
    candidates = []
    for rank, s in enumerate(starts[:top]):
        candidates.append(Candidate(removed=tuple(range(int(s), int(s) + n_remove)), score=float(d[s]), rank=rank,
                                    tied_with_previous=rank > 0 and d[s] == d[starts[rank - 1]]))
    return Ranking(method="angular", n_blocks=n, n_remove=n_remove, candidates=candidates, exact=True,
                   info={"criterion": "arccos(cos(x_l, x_{l+n}))/pi at the last token, mean over samples",
                         "reference": ANGULAR_REFERENCE, "window_distances": d.tolist(), "keep": sorted(keep),
                         "forward_passes": 1, "seconds": stats.seconds})


def norm_ratio(model: torch.nn.Module, calibration: CalibrationSet, n_remove: int, *, top: int = 1,
               batch_size: int = 8, keep: Iterable[int] = (), stats: BlockStats | None = None) -> Ranking:
    """Ministral 3's layer criterion: r_i = mean over tokens of ||x_out|| / ||x_in|| of block i; the
    blocks that change the norm of their input least (lowest r_i) are removed. Candidate score: the
    sum of the removed blocks' r_i. (Equivalently: highest input/output ratio.)"""
    stats = stats or collect_block_stats(model, calibration, batch_size=batch_size)
    return top_m_ranking("norm-ratio", stats.norm_ratio_mean, n_remove, top, keep=keep,
                         info={"criterion": "mean token ||block output|| / ||block input||, lowest removed",
                               "reference": NORM_RATIO_REFERENCE, "n_tokens": stats.n_tokens,
                               "forward_passes": 1, "seconds": stats.seconds})
