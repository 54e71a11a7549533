"""Criteria from the calibration loss: Shortened-LLaMA's PPL and Taylor+, and SLEB.

    ppl     Kim et al. 2024 (Shortened LLaMA): calibration perplexity with each single block
            removed; the M blocks whose removal hurts least are removed (one shot).
    taylor  Kim et al. 2024 (Shortened LLaMA), "Taylor+": block importance
            I_b = sum over the block's weight tensors W, sum over entries |sum_batches W * dL/dW|
            (first-order Taylor estimate of the loss change when the block is zeroed), with the
            "+" heuristic of the reference code: the first four and the last two blocks are never
            removed.
    sleb    Song et al. 2024 (SLEB): greedy; at each step remove the block whose removal gives the
            lowest calibration perplexity of the current model, then re-score all others.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import numpy as np
import torch

from cboprune.baselines._common import top_m_ranking
from cboprune.data.calibration import CalibrationSet
from cboprune.models.gating import GateManager
from cboprune.models.masked import n_blocks, single_removal_nll
from cboprune.models.forward_loss import model_device, per_sample_loss
from cboprune.models.architectures import blocks
from cboprune.core.ranking import Candidate, Ranking, check_n_remove

log = logging.getLogger(__name__)

SHORTENED_REFERENCE = "Kim et al., Shortened LLaMA (arXiv:2402.02834)"
SLEB_REFERENCE = "Song et al., SLEB (arXiv:2402.09025)"
#: Taylor+ keeps the first TAYLOR_PLUS_FIRST and the last TAYLOR_PLUS_LAST blocks.
TAYLOR_PLUS_FIRST, TAYLOR_PLUS_LAST = 4, 2


def perplexity_criterion(model: torch.nn.Module, calibration: CalibrationSet, n_remove: int, *, top: int = 1,
                         batch_size: int = 8, keep: Iterable[int] = (),
                         single_nll: dict[int, float] | None = None) -> Ranking:
    """Shortened-LLaMA PPL: block score = calibration perplexity without that block (one shot).
    Candidate score: the sum of the removed blocks' perplexities. `single_nll` reuses
    `single_removal_nll` (SLEB's first step computes the same numbers)."""
    start = time.perf_counter()
    n = n_blocks(model)
    single_nll = single_nll if single_nll is not None else single_removal_nll(model, calibration,
                                                                               batch_size=batch_size)
    ppl = np.array([math.exp(single_nll[j]) for j in range(n)])
    return top_m_ranking("ppl", ppl, n_remove, top, keep=keep,
                         info={"criterion": "calibration perplexity with the block removed", "reference": SHORTENED_REFERENCE,
                               "forward_passes": n, "seconds": round(time.perf_counter() - start, 2)})


def sleb(model: torch.nn.Module, calibration: CalibrationSet, n_remove: int, *, batch_size: int = 8,
         keep: Iterable[int] = (), first_step: dict[int, float] | None = None) -> Ranking:
    """SLEB: greedy removal by calibration perplexity, re-scoring every remaining block after each
    removal. Candidate score: the calibration perplexity of the final selection.

    info["order"]: blocks in removal order; info["step_ppl"]: the perplexity after each removal.
    Prefix-consistent: the selection for a smaller M is `info["order"][:M]`. `first_step` reuses
    `single_removal_nll` of the full model (the PPL criterion's numbers).
    """
    n = n_blocks(model)
    keep = set(keep)
    check_n_remove(n_remove, n, len(keep))
    start = time.perf_counter()
    removed: list[int] = []
    step_ppl: list[float] = []
    passes = 0
    gates = GateManager(model, blocks(model))
    try:
        for step in range(n_remove):
            if step == 0 and first_step is not None:
                nll = {j: v for j, v in first_step.items() if j not in keep}
            else:
                nll = single_removal_nll(model, calibration, batch_size=batch_size, removed=removed, gates=gates,
                                         skip=keep)
                passes += len(nll)
            pick = min(nll, key=lambda j: (nll[j], j))
            removed.append(pick)
            step_ppl.append(math.exp(nll[pick]))
            log.info("sleb step %d: remove block %d, calibration perplexity %.3f", step + 1, pick, step_ppl[-1])
    finally:
        gates.remove()
    cand = Candidate(removed=tuple(sorted(removed)), score=step_ppl[-1], rank=0)
    return Ranking(method="sleb", n_blocks=n, n_remove=n_remove, candidates=[cand],
                   info={"criterion": "greedy: lowest calibration perplexity after removal, re-scored each step",
                         "reference": SLEB_REFERENCE, "order": removed, "step_ppl": step_ppl, "keep": sorted(keep),
                         "forward_passes": passes, "seconds": round(time.perf_counter() - start, 2)})


def taylor_scores(model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8) -> np.ndarray:
    """Per-block first-order Taylor importance: sum over every weight of the block of
    |sum over batches of w * dL_batch/dw|, L_batch the batch's mean token cross-entropy (as in the
    Shortened-LLaMA reference code: saliences accumulate signed over batches, then abs, then sum)."""
    device = model_device(model)
    block_list = blocks(model)
    # Weight tensors only (biases excluded), as in the reference code; norms included.
    params = [[p for name, p in b.module.named_parameters() if name.endswith("weight") and p.dtype.is_floating_point]
              for b in block_list]
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for ps in params:
        for p in ps:
            p.requires_grad_(True)
            p.grad = None
    salience = [[torch.zeros_like(p, dtype=torch.float32) for p in ps] for ps in params]
    was_training = model.training
    model.eval()
    try:
        for _, ids, mask in calibration.batches(batch_size):
            ids, mask = ids.to(device), mask.to(device)
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                n_valid = mask[:, 1:].sum(dim=1)
                loss = (per_sample_loss(logits, ids, mask) * n_valid).sum() / n_valid.sum().clamp_min(1)
                loss.backward()
            with torch.no_grad():
                for ps, ss in zip(params, salience):
                    for p, s in zip(ps, ss):
                        if p.grad is not None:
                            s.add_((p.detach() * p.grad).float())
                            p.grad = None
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)
    return np.array([sum(float(s.abs().sum()) for s in ss) for ss in salience])


def taylor_plus(model: torch.nn.Module, calibration: CalibrationSet, n_remove: int, *, top: int = 1,
                batch_size: int = 8, keep: Iterable[int] = (), plus: bool = True,
                scores: np.ndarray | None = None) -> Ranking:
    """Shortened-LLaMA Taylor+: remove the M blocks of lowest Taylor importance, never the first
    four or the last two (`plus=False`: plain Taylor). Candidate score: the sum of the removed
    blocks' importance."""
    start = time.perf_counter()
    n = n_blocks(model)
    s = scores if scores is not None else taylor_scores(model, calibration, batch_size=batch_size)
    fixed = set(keep)
    if plus:
        heuristic = {*range(min(TAYLOR_PLUS_FIRST, n)), *range(max(n - TAYLOR_PLUS_LAST, 0), n)}
        if n - len(fixed | heuristic) >= n_remove:
            fixed |= heuristic
        else:
            log.warning("taylor: the '+' heuristic (keep the first %d and last %d blocks) leaves fewer than M = %d "
                        "removable blocks of %d; applied without it", TAYLOR_PLUS_FIRST, TAYLOR_PLUS_LAST, n_remove, n)
            plus = False
    return top_m_ranking("taylor", s, n_remove, top, keep=fixed,
                         info={"criterion": "sum |w * dL/dw| over the block's weights" + (", first 4 and last 2 "
                                            "blocks kept (Taylor+)" if plus else ""),
                               "reference": SHORTENED_REFERENCE, "plus_heuristic": plus,
                               "forward_passes": 1, "backward_passes": 1,
                               "seconds": round(time.perf_counter() - start, 2)})
