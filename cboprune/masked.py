"""Masked evaluation: the model's loss with some blocks switched off, the core measurement under
the Hessian pass, the energy models, verification and the peer criteria.

Blocks are switched off with `GateManager` gates at 0, which is exactly the model without them
(tested equal to surgery), so no weights are copied. Several configurations share one forward pass:
the batch is repeated once per configuration with per-sample gates.

    per_sample_loss(logits, ids, mask)      [B] mean next-token cross-entropy per sample
    sample_losses(model, ids, mask)         the same from a forward pass, logits only where a target is
    calibration_nll(model, calib, removed)  token-weighted mean NLL with `removed` off
    configurations_nll(model, calib, cfgs)  one NLL per configuration, several per forward pass
    single_removal_nll(model, calib)        {block: NLL} with each block removed in turn
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from cboprune.gating import GateManager
from cboprune.models.architectures import decoder_layers

if TYPE_CHECKING:
    from cboprune.data.calibration import CalibrationSet

log = logging.getLogger(__name__)

# Whether logits computed only at target positions matched the full head, per model (checked once).
_TARGET_ROWS_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def n_blocks(model: torch.nn.Module) -> int:
    """The number of decoder blocks N (the one definition every module uses)."""
    return len(decoder_layers(model)[1])


def per_sample_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample over its real tokens.

    logits: [B, S, V]; input_ids, attention_mask: [B, S] -> [B] (fp32 at least)
    """
    B, S, V = logits.shape
    # Flat [B*S, V] rows keep a contiguous logits tensor uncopied; the last position of every
    # sample has no target and is ignored.
    targets = torch.cat([input_ids[:, 1:], input_ids.new_full((B, 1), -100)], dim=1)  # [B, S]
    valid = torch.cat([attention_mask[:, 1:], attention_mask.new_zeros((B, 1))], dim=1)
    targets = targets.masked_fill(valid == 0, -100)
    logits = logits.reshape(B * S, V).to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits, targets.reshape(-1), reduction="none", ignore_index=-100).view(B, S)
    valid = valid.to(nll.dtype)
    return (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)


@contextmanager
def head_rows(model: torch.nn.Module, select):
    """Within: the output head sees only some hidden states, `select([B, S, D]) -> [R, D]`, as one
    [1, R, D] batch, so the head (a vocabulary-wide matrix product, the largest single layer of a
    small model) runs on R rows instead of B * S. Yields a list that holds True once the head ran on
    the selection; a head that never runs, or sees another shape, is left untouched (the caller then
    has full logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    fired: list[bool] = []
    if head is None:
        yield fired
        return

    def gather(_module, args):
        picked = select(args[0])
        if picked is None:
            return None
        fired.append(True)
        return (picked[None],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield fired
    finally:
        handle.remove()


def sample_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  **forward_kwargs) -> torch.Tensor:
    """`per_sample_loss` of one forward pass, with logits only at the positions that have a target.

    Padding and the last position of every sample need no logits; on the 49k-word vocabulary of
    the default model the head is about a fifth of a forward pass, so this saves what padding
    costs there. Checked once per model against the full head (a head whose output is
    post-processed across positions would differ); any mismatch means full logits from then on.
    """
    B, S = input_ids.shape
    verdict = _TARGET_ROWS_OK.get(model)
    if verdict is False:
        return _full_loss(model, input_ids, attention_mask, forward_kwargs)
    valid = torch.cat([attention_mask[:, 1:], attention_mask.new_zeros((B, 1))], dim=1).reshape(-1) > 0
    rows = valid.nonzero().squeeze(1)  # flat positions b * S + t with a next-token target

    def select(hidden):
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, S):
            return None
        return hidden.reshape(B * S, -1).index_select(0, rows.to(hidden.device))

    with head_rows(model, select) as fired:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits
    if not fired or tuple(logits.shape[:2]) != (1, rows.numel()):
        if verdict is None:
            log.debug("logits at target positions only: not available for %s", type(model).__name__)
            _TARGET_ROWS_OK[model] = False
        return (per_sample_loss(logits, input_ids, attention_mask) if tuple(logits.shape[:2]) == (B, S)
                else _full_loss(model, input_ids, attention_mask, forward_kwargs))
    targets = torch.cat([input_ids[:, 1:], input_ids.new_zeros((B, 1))], dim=1).reshape(-1)[rows]
    flat = logits[0].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(flat, targets.to(flat.device), reduction="none")  # [R]
    sample = (rows // S).to(nll.device)
    total = nll.new_zeros(B).index_add_(0, sample, nll)
    count = nll.new_zeros(B).index_add_(0, sample, torch.ones_like(nll))
    loss = total / count.clamp_min(1)
    if verdict is None:
        ref = _full_loss(model, input_ids, attention_mask, forward_kwargs)
        ok = bool((loss - ref).abs().max() <= 1e-5 * (1.0 + float(ref.abs().max())))
        _TARGET_ROWS_OK[model] = ok
        if not ok:
            log.info("logits at target positions only are off for %s: they differ from the full head",
                     type(model).__name__)
            return ref
    return loss


def _full_loss(model, input_ids, attention_mask, forward_kwargs) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits
    return per_sample_loss(logits, input_ids, attention_mask)


@contextmanager
def inference(model: torch.nn.Module):
    """eval mode and no autograd for the duration; restores the training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


@contextmanager
def removed_blocks(model: torch.nn.Module, removed: Sequence[int], gates: GateManager | None = None):
    """Switch blocks off with gates at 0 for the duration (a fresh manager unless one is given)."""
    own = gates is None
    gates = gates or GateManager(model)
    gates.set(gates.removal_gates(list(removed)) if removed else None)
    try:
        yield gates
    finally:
        gates.set(None)
        if own:
            gates.remove()


def calibration_nll(model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8,
                    removed: Sequence[int] = (), gates: GateManager | None = None) -> float:
    """Token-weighted mean next-token NLL over the calibration set with `removed` switched off
    (log of the calibration perplexity)."""
    device = model_device(model)
    total, count = 0.0, 0
    with inference(model), removed_blocks(model, removed, gates):
        for _, ids, mask in calibration.batches(batch_size):
            ids, mask = ids.to(device), mask.to(device)
            n_valid = mask[:, 1:].sum(dim=1)
            total += float((sample_losses(model, ids, mask) * n_valid).sum())
            count += int(n_valid.sum())
    return total / max(count, 1)


def configurations_nll(model: torch.nn.Module, calibration: CalibrationSet, configs: Sequence[Sequence[int]], *,
                       batch_size: int = 8, gates: GateManager | None = None,
                       rows_per_pass: int | None = None, prefix_reuse: bool | None = None) -> np.ndarray:
    """Calibration NLL (token-weighted mean) of the model with each configuration's blocks switched
    off, one value per configuration.

    Configurations that keep the same first blocks share the computation of those blocks
    (`cboprune.shared_prefix`; prefix_reuse None: when that saves at least a fifth of the layer work
    and the model passes the one-time equality check). Otherwise several configurations share one
    forward pass: the calibration batch is repeated once per configuration and per-sample gates
    [rows, N] switch off different blocks in each copy (the same numbers as separate passes; fewer,
    larger matrix products). `rows_per_pass` bounds that stacked batch (default 4 * batch_size).
    In a process group (torchrun / accelerate) the configurations are split across the processes and
    the values gathered, so every process must call this with the same arguments.
    """
    from cboprune import distributed

    configs = [tuple(sorted({int(i) for i in c})) for c in configs]
    dinfo = distributed.info()
    mine = list(range(dinfo.rank, len(configs), dinfo.world_size))  # every configuration when alone
    own = gates is None
    gates = gates or GateManager(model)
    rows = rows_per_pass or 4 * batch_size
    device = model_device(model)
    total = np.zeros(len(configs))
    count = 0
    evaluator = _prefix_evaluator(model, gates, [configs[k] for k in mine], prefix_reuse)

    def plain(ids, mask, chunk: Sequence[tuple[int, ...]]) -> torch.Tensor:  # [C, b] per-sample losses
        b = ids.shape[0]
        g = torch.stack([gates.removal_gates(list(c)) for c in chunk])  # [C, N]
        gates.set(g.repeat_interleave(b, dim=0).to(device))  # [C*b, N]
        c_ids, c_mask = ids.repeat(len(chunk), 1), mask.repeat(len(chunk), 1)
        return sample_losses(model, c_ids, c_mask).view(len(chunk), b)

    try:
        with inference(model):
            for _, ids, mask in calibration.batches(batch_size):
                ids, mask = ids.to(device), mask.to(device)
                b = ids.shape[0]
                n_valid = mask[:, 1:].sum(dim=1)
                count += int(n_valid.sum())
                todo = [configs[k] for k in mine]
                if evaluator is not None and todo:
                    from cboprune.shared_prefix import check_prefix_reuse

                    if check_prefix_reuse(model, evaluator, ids, mask, todo, lambda cs: plain(ids, mask, cs)):
                        losses = evaluator.losses(ids, mask, todo)
                        for k in mine:
                            total[k] += float((losses[configs[k]] * n_valid).sum().double())
                        continue
                    evaluator.close()
                    evaluator = None
                per = max(1, rows // b)
                for lo in range(0, len(mine), per):
                    chunk = mine[lo:lo + per]
                    loss = plain(ids, mask, [configs[k] for k in chunk])
                    total[chunk] += (loss * n_valid).sum(dim=1).double().cpu().numpy()
    finally:
        if evaluator is not None:
            evaluator.close()
        gates.set(None)
        if own:
            gates.remove()
    if dinfo.enabled:
        total = distributed.all_reduce_sum(total)  # every process read all of the data: count is the same
    return total / max(count, 1)


def _prefix_evaluator(model, gates, configs, prefix_reuse: bool | None):
    """A shared-prefix evaluator when it is asked for, or (None) worth it; else None."""
    if prefix_reuse is False or len(configs) < 2:
        return None
    from cboprune.shared_prefix import PrefixEvaluator, layer_cost

    path, layers = decoder_layers(model)
    if prefix_reuse is None:
        shared, plain = layer_cost(configs, len(layers))
        if shared > 0.8 * plain:
            return None
    return PrefixEvaluator(model, gates, path, layers)


def single_removal_nll(model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8,
                       removed: Sequence[int] = (), gates: GateManager | None = None,
                       skip: Iterable[int] = (), rows_per_pass: int | None = None) -> dict[int, float]:
    """Calibration NLL (token-weighted mean) of the model with `removed` off and each other block
    also removed, {block: nll} (see `configurations_nll`)."""
    todo = [j for j in range(n_blocks(model)) if j not in set(skip) | set(removed)]
    nll = configurations_nll(model, calibration, [[*removed, j] for j in todo], batch_size=batch_size,
                             gates=gates, rows_per_pass=rows_per_pass)
    return {j: float(v) for j, v in zip(todo, nll)}
