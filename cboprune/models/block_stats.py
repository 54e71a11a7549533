"""Block input/output statistics from one calibration pass with forward hooks on the decoder layers:
the similarity criteria (BI, angular distance, norm ratio) and the engine's shared selection context
read them."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cboprune.data.calibration import CalibrationSet
from cboprune.core.errors import CBOPruneError
from cboprune.models.gating import GateManager
from cboprune.models.masked import inference, removed_blocks
from cboprune.models.forward_loss import model_device
from cboprune.models.architectures import decoder_layers

log = logging.getLogger(__name__)


@dataclass
class BlockStats:
    """Per-block statistics of one calibration pass, from the exact inputs/outputs of the blocks.

    cos_mean: [N] mean over real tokens of cos(x_in, x_out) of block i.
    norm_ratio_mean: [N] mean over real tokens of ||x_out|| / ||x_in||.
    last_token: [N+1, m, D] hidden state at each sample's last real token: entry i is block i's
        input, entry N the last block's output (before the final norm).
    """

    cos_mean: np.ndarray
    norm_ratio_mean: np.ndarray
    last_token: np.ndarray
    n_tokens: int
    removed: tuple[int, ...] = ()
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return len(self.cos_mean)


def _hidden(args, kwargs) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    h = kwargs.get("hidden_states")
    if h is None:
        raise CBOPruneError("cannot find the hidden-state input of a decoder layer: this architecture needs an "
                            "entry in cboprune/models/architectures.py")
    return h


def collect_block_stats(model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8,
                        removed: Sequence[int] = (), gates: GateManager | None = None) -> BlockStats:
    """One calibration pass with forward hooks on the decoder layers (blocks in `removed` gated off)."""
    _, layers = decoder_layers(model)
    n = len(layers)
    device = model_device(model)
    cos_sum = np.zeros(n)
    ratio_sum = np.zeros(n)
    last: list[list[torch.Tensor]] = [[] for _ in range(n + 1)]
    state: dict[str, torch.Tensor] = {}

    def make_hook(i: int):
        def hook(module, args, kwargs, output):
            x_in = _hidden(args, kwargs).float()  # [B, S, D]
            x_out = (output[0] if isinstance(output, tuple) else output).float()
            valid = state["mask"]  # [B, S] bool
            cos = F.cosine_similarity(x_in, x_out, dim=-1)  # [B, S]
            ratio = x_out.norm(dim=-1) / x_in.norm(dim=-1).clamp_min(1e-12)
            cos_sum[i] += float(cos[valid].double().sum())
            ratio_sum[i] += float(ratio[valid].double().sum())
            rows = torch.arange(x_in.shape[0], device=x_in.device)
            last[i].append(x_in[rows, state["last"]].cpu())
            if i == n - 1:
                last[n].append(x_out[rows, state["last"]].cpu())
        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    start = time.perf_counter()
    n_tokens = 0
    try:
        with inference(model), removed_blocks(model, removed, gates):
            for _, ids, mask in calibration.batches(batch_size):
                ids, mask = ids.to(device), mask.to(device)
                state["mask"] = mask.bool()
                state["last"] = mask.sum(dim=1) - 1
                n_tokens += int(mask.sum())
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return BlockStats(cos_mean=cos_sum / n_tokens, norm_ratio_mean=ratio_sum / n_tokens,
                      last_token=torch.stack([torch.cat(x) for x in last]).numpy(), n_tokens=n_tokens,
                      removed=tuple(sorted(removed)), seconds=round(time.perf_counter() - start, 2))
