"""The peers of CBO: every block-selection criterion the paper compares with, one registration module
each (see `cboprune.core.methods`), returning the same `Ranking` as the CBO solvers so that reports,
surgery and evaluation never special-case a method.

    module            names          criterion (reference)
    block_influence   bi, bi-iter    Block Influence, one shot / recomputed after each removal (ShortGPT)
    angular           angular        best contiguous window by last-token angle (Gromov et al.)
    norm_ratio        norm-ratio     block output/input norm ratio (Ministral 3)
    ppl               ppl            perplexity with one block removed (Shortened LLaMA)
    taylor            taylor         Taylor+ first-order weight saliency (Shortened LLaMA)
    sleb              sleb           greedy removal by calibration perplexity (SLEB)
    swm               swm            sliding-window merging (Ding et al. 2025), merged checkpoint
    last_blocks       last-m         the last M blocks before the final one (no data)

The implementations shared by several criteria are in the private modules `_similarity`,
`_loss_based`, `_swm` and `_common` (they import torch; the registration modules import them only
inside `select`). To add a criterion: one module here that calls `register(Method(...))`, and its
test; `cboprune.engine.experiment.select` runs any of them by name.
"""
