"""The peers of CBO: every block-selection criterion the paper compares with, returning the same
`Ranking` as the CBO solvers so that reports, surgery and evaluation never special-case a method.

    name        criterion (reference)                                          module
    bi          Block Influence, one shot (ShortGPT, Men et al. 2024)          similarity
    bi-iter     Block Influence recomputed after each removal (the paper's BI) similarity
    angular     best contiguous window by last-token angle (Gromov et al.)     similarity
    norm-ratio  block output/input norm ratio (Ministral 3, Mistral AI 2026)   similarity
    ppl         perplexity with one block removed (Shortened LLaMA)            loss_based
    taylor      Taylor+ first-order weight saliency (Shortened LLaMA)          loss_based
    sleb        greedy removal by calibration perplexity (SLEB)                loss_based
    swm         sliding-window merging (Ding et al. 2025), merged checkpoint   swm

`run_criterion(name, model, calibration, n_remove)` runs any of them;
`cboprune.compare.run_compare` runs them all next to CBO and evaluates the results.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from cboprune.baselines._common import BlockStats, calibration_nll, collect_block_stats, top_m_ranking
from cboprune.baselines.loss_based import (configurations_nll, perplexity_criterion, single_removal_nll, sleb, taylor_plus,
                                           taylor_scores)
from cboprune.baselines.similarity import (angular_distance, angular_distances, block_influence,
                                           block_influence_iterative, block_influence_scores, norm_ratio)
from cboprune.baselines.swm import sliding_window_merging
from cboprune.data.calibration import CalibrationSet
from cboprune.errors import CBOPruneError
from cboprune.ranking import Ranking

#: name -> one-line description (the order used in tables).
CRITERIA: dict[str, str] = {
    "bi": "Block Influence, one shot (Men et al., ShortGPT)",
    "bi-iter": "Block Influence, iterative (Men et al., as in the CBO paper)",
    "angular": "angular distance, contiguous window (Gromov et al.)",
    "norm-ratio": "norm ratio (Mistral AI, Ministral 3)",
    "sleb": "SLEB, greedy by calibration perplexity (Song et al.)",
    "ppl": "PPL, one shot (Kim et al., Shortened LLaMA)",
    "taylor": "Taylor+ (Kim et al., Shortened LLaMA)",
    "swm": "sliding-window merging (Ding et al.)",
}


def check_names(names: Iterable[str], known: Iterable[str]) -> list[str]:
    """Validate method names, answering an unknown one with a suggestion and the full list."""
    import difflib

    known = list(known)
    out = []
    for name in names:
        name = name.strip().lower()
        if not name:
            continue
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise CBOPruneError(f"unknown method {name!r}{hint}: available: {', '.join(known)}")
        if name not in out:
            out.append(name)
    if not out:
        raise CBOPruneError(f"no method given: choose from {', '.join(known)}")
    return out


def run_criterion(name: str, model: torch.nn.Module, calibration: CalibrationSet, n_remove: int, *,
                  top: int = 1, batch_size: int = 8, keep: Iterable[int] = (), **options: Any) -> Ranking:
    """Run one criterion by name. One-shot criteria return `top` candidates in exact order;
    iterative ones (bi-iter, sleb) and swm return one."""
    (name,) = check_names([name], CRITERIA)
    common = {"batch_size": batch_size}
    if name == "swm":
        if keep:
            raise CBOPruneError("swm does not support --keep")
        return sliding_window_merging(model, calibration, n_remove, **common, **options)
    fn = {"bi": block_influence, "bi-iter": block_influence_iterative, "angular": angular_distance,
          "norm-ratio": norm_ratio, "sleb": sleb, "ppl": perplexity_criterion, "taylor": taylor_plus}[name]
    if name not in ("bi-iter", "sleb"):
        common["top"] = top
    return fn(model, calibration, n_remove, keep=keep, **common, **options)


__all__ = ["CRITERIA", "BlockStats", "angular_distance", "angular_distances", "block_influence",
           "block_influence_iterative", "block_influence_scores", "calibration_nll", "check_names",
           "collect_block_stats", "configurations_nll", "norm_ratio", "perplexity_criterion", "run_criterion", "single_removal_nll",
           "sleb", "sliding_window_merging", "taylor_plus", "taylor_scores", "top_m_ranking"]
