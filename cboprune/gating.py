"""Gates alpha_i on every block's residual branches, attached as forward hooks by one manager.

With gates g (shape [N] or per-sample [B, N]) each gated branch output y of block i becomes
g[..., i] * y, so `h = h + g_i * ATTN(h)`, `h = h + g_i * FFN(h)`. g = 1 reproduces the model;
g_i = 0 is the model without block i. A per-sample gate [B, N] lets one backward pass return every
sample's gradient: d(sum_b loss_b)/d g[b, :] = d loss_b / d g[b, :].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cboprune.errors import CBOPruneError
from cboprune.models.architectures import Block, blocks


def broadcast_gate(gate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gate [] or per-sample [B] as like's device and dtype, shaped to multiply like [B, S, D]."""
    g = gate.to(device=like.device, dtype=like.dtype)
    return g.view(-1, *([1] * (like.dim() - 1))) if g.dim() == 1 else g


class GateManager:
    """Owns the gate hooks of one model. Use as a context manager, or call `remove()`.

    Hooks are inert while `gates` is None, so a manager can stay attached between uses.
    """

    def __init__(self, model: nn.Module, block_list: Sequence[Block] | None = None):
        self.model = model
        self.blocks = list(block_list) if block_list is not None else blocks(model)
        self.gates: torch.Tensor | None = None  # [N] or [B, N]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        owner: dict[int, str] = {}
        for block in self.blocks:
            for branch in block.branches:
                module = model.get_submodule(branch)
                if id(module) in owner:  # a module shared by two blocks would be scaled by both gates
                    self.remove()
                    raise CBOPruneError(f"branch {branch} is the same module as {owner[id(module)]}: blocks that "
                                        "share weights cannot be gated one by one")
                owner[id(module)] = branch
                self._handles.append(module.register_forward_hook(self._make_hook(block.index)))

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def scale(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Branch output y [B, S, D] times its gate: a scalar [] or per-sample [B]."""
        return y * broadcast_gate(gate, y)

    def _make_hook(self, index: int):
        def hook(module: nn.Module, args, output):
            gates = self.gates
            if gates is None:
                return None
            y = output[0] if isinstance(output, tuple) else output  # [B, S, D]
            y = self.scale(y, gates[..., index])
            return (y, *output[1:]) if isinstance(output, tuple) else y

        return hook

    def set(self, gates: torch.Tensor | Sequence[float] | None) -> None:
        """Set the gates: shape [N] (shared by all samples), [B, N] (per sample) or None (off)."""
        if gates is not None:
            gates = torch.as_tensor(gates)
            if gates.shape[-1] != self.n_blocks or gates.dim() not in (1, 2):
                raise ValueError(f"gates must have shape [{self.n_blocks}] or [B, {self.n_blocks}], "
                                 f"got {tuple(gates.shape)}")
        self.gates = gates

    def removal_gates(self, removed: Sequence[int], batch: int | None = None) -> torch.Tensor:
        """Gates that switch off the blocks in `removed`: [N], or [batch, N] when batch is given."""
        g = torch.ones(self.n_blocks)
        g[list(removed)] = 0.0
        return g if batch is None else g.expand(batch, -1).clone()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.gates = None

    def __enter__(self) -> GateManager:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
