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
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from cboprune.core import distributed
from cboprune.models.gating import GateManager
from cboprune.models.architectures import blocks, decoder_layers
from cboprune.models.forward_loss import model_device, sample_losses
from cboprune.models.shared_prefix import PrefixEvaluator, check_prefix_reuse, layer_cost

if TYPE_CHECKING:
    from cboprune.data.calibration import CalibrationSet

log = logging.getLogger(__name__)

def n_blocks(model: torch.nn.Module) -> int:
    """The number of decoder blocks N (the one definition every module uses)."""
    return len(decoder_layers(model)[1])


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
    gates = gates or GateManager(model, blocks(model))
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
    (`cboprune.models.shared_prefix`; prefix_reuse None: when that saves at least a fifth of the layer work
    and the model passes the one-time equality check). Otherwise several configurations share one
    forward pass: the calibration batch is repeated once per configuration and per-sample gates
    [rows, N] switch off different blocks in each copy (the same numbers as separate passes; fewer,
    larger matrix products). `rows_per_pass` bounds that stacked batch (default 4 * batch_size).
    In a process group (torchrun / accelerate) the configurations are split across the processes and
    the values gathered, so every process must call this with the same arguments.
    """

    configs = [tuple(sorted({int(i) for i in c})) for c in configs]
    dinfo = distributed.info()
    mine = list(range(dinfo.rank, len(configs), dinfo.world_size))  # every configuration when alone
    own = gates is None
    gates = gates or GateManager(model, blocks(model))
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
