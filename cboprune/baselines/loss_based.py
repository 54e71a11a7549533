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
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from cboprune.baselines._common import check_n_remove, inference, model_device, n_blocks_of, top_m_ranking
from cboprune.data.calibration import CalibrationSet
from cboprune.gating import GateManager
from cboprune.hessian import per_sample_loss
from cboprune.models.architectures import blocks
from cboprune.ranking import Candidate, Ranking

log = logging.getLogger(__name__)

SHORTENED_REFERENCE = "Kim et al., Shortened LLaMA (arXiv:2402.02834)"
SLEB_REFERENCE = "Song et al., SLEB (arXiv:2402.09025)"
#: Taylor+ keeps the first TAYLOR_PLUS_FIRST and the last TAYLOR_PLUS_LAST blocks.
TAYLOR_PLUS_FIRST, TAYLOR_PLUS_LAST = 4, 2


def configurations_nll(model: torch.nn.Module, calibration: CalibrationSet, configs: Sequence[Sequence[int]], *,
                       batch_size: int = 8, gates: GateManager | None = None,
                       rows_per_pass: int | None = None) -> np.ndarray:
    """Calibration NLL (token-weighted mean) of the model with each configuration's blocks switched
    off, one value per configuration.

    Several configurations share one forward pass: the calibration batch is repeated once per
    configuration and per-sample gates [rows, N] switch off different blocks in each copy (exactly
    the same numbers as separate passes; fewer, larger matrix products). `rows_per_pass` bounds
    the stacked batch (default 4 * batch_size).
    """
    configs = [tuple(int(i) for i in c) for c in configs]
    own = gates is None
    gates = gates or GateManager(model)
    rows = rows_per_pass or 4 * batch_size
    device = model_device(model)
    total = np.zeros(len(configs))
    count = 0
    try:
        with inference(model):
            for _, ids, mask in calibration.batches(batch_size):
                ids, mask = ids.to(device), mask.to(device)
                b = ids.shape[0]
                n_valid = mask[:, 1:].sum(dim=1)
                count += int(n_valid.sum())
                per = max(1, rows // b)
                for lo in range(0, len(configs), per):
                    chunk = configs[lo:lo + per]
                    g = torch.stack([gates.removal_gates(list(c)) for c in chunk])  # [C, N]
                    gates.set(g.repeat_interleave(b, dim=0).to(device))  # [C*b, N]
                    c_ids, c_mask = ids.repeat(len(chunk), 1), mask.repeat(len(chunk), 1)
                    logits = model(input_ids=c_ids, attention_mask=c_mask, use_cache=False).logits
                    loss = per_sample_loss(logits, c_ids, c_mask)
                    total[lo:lo + len(chunk)] += (loss.view(len(chunk), b) * n_valid).sum(dim=1).double().cpu().numpy()
    finally:
        gates.set(None)
        if own:
            gates.remove()
    return total / max(count, 1)


def single_removal_nll(model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8,
                       removed: Sequence[int] = (), gates: GateManager | None = None,
                       skip: Iterable[int] = (), rows_per_pass: int | None = None) -> dict[int, float]:
    """Calibration NLL (token-weighted mean) of the model with `removed` off and each other block
    also removed, {block: nll} (see `configurations_nll`)."""
    n = n_blocks_of(model)
    todo = [j for j in range(n) if j not in set(skip) | set(removed)]
    nll = configurations_nll(model, calibration, [[*removed, j] for j in todo], batch_size=batch_size,
                             gates=gates, rows_per_pass=rows_per_pass)
    return {j: float(v) for j, v in zip(todo, nll)}


def perplexity_criterion(model: torch.nn.Module, calibration: CalibrationSet, n_remove: int, *, top: int = 1,
                         batch_size: int = 8, keep: Iterable[int] = (),
                         single_nll: dict[int, float] | None = None) -> Ranking:
    """Shortened-LLaMA PPL: block score = calibration perplexity without that block (one shot).
    Candidate score: the sum of the removed blocks' perplexities. `single_nll` reuses
    `single_removal_nll` (SLEB's first step computes the same numbers)."""
    start = time.perf_counter()
    n = n_blocks_of(model)
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
    n = n_blocks_of(model)
    keep = set(keep)
    check_n_remove(n_remove, n, len(keep))
    start = time.perf_counter()
    removed: list[int] = []
    step_ppl: list[float] = []
    passes = 0
    gates = GateManager(model)
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
    n = n_blocks_of(model)
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
