"""Gates alpha_i on every block's residual branches, attached as forward hooks by one manager.

With gates g (shape [N] or per-sample [B, N]) each gated branch output y of block i becomes
g[..., i] * y, so `h = h + g_i * ATTN(h)`, `h = h + g_i * FFN(h)`. g = 1 reproduces the model;
g_i = 0 is the model without block i. A per-sample gate [B, N] lets one backward pass return every
sample's gradient: d(sum_b loss_b)/d g[b, :] = d loss_b / d g[b, :].

Blocks with gating "layer" (the generic fallback for a layer whose branches are not recognised)
gate the whole residual update instead: h_out = g * layer(h) + (1 - g) * h, which is
h + g * (layer(h) - h), written so that g = 1 gives layer(h) and g = 0 gives h bit for bit.
`check_gates` verifies on the real model that a set of gates is exact at 0 and 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from cboprune.core.errors import CBOPruneError

if TYPE_CHECKING:
    from cboprune.models.architectures import Block


def broadcast_gate(gate: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A gate [] or per-sample [B] as like's device and dtype, shaped to multiply like [B, S, D]."""
    g = gate.to(device=like.device, dtype=like.dtype)
    return g.view(-1, *([1] * (like.dim() - 1))) if g.dim() == 1 else g


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a decoder layer was called with (first positional or `hidden_states`)."""
    h = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(h, torch.Tensor):
        raise CBOPruneError("cannot gate the whole layer: its first input is not the hidden-state tensor")
    return h


class GateManager:
    """Owns the gate hooks of one model. Use as a context manager, or call `remove()`.

    Hooks are inert while `gates` is None, so a manager can stay attached between uses. The blocks
    are given (`models.architectures.blocks(model)`): architecture discovery verifies its guesses
    for unknown families with `check_gates`, so this module must not depend on it.
    """

    def __init__(self, model: nn.Module, block_list: Sequence[Block]):
        self.model = model
        self.blocks = list(block_list)
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
                if block.gating == "layer":
                    hook = module.register_forward_hook(self._make_layer_hook(block.index), with_kwargs=True)
                else:
                    hook = module.register_forward_hook(self._make_hook(block.index))
                self._handles.append(hook)

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

    def _make_layer_hook(self, index: int):
        def hook(module: nn.Module, args, kwargs, output):
            gates = self.gates
            if gates is None:
                return None
            h = layer_input(args, kwargs)  # [B, S, D]
            y = output[0] if isinstance(output, tuple) else output
            g = gates[..., index]
            y = self.scale(y, g) + self.scale(h, 1 - g)
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


def _probe_ids(model: nn.Module) -> torch.Tensor:
    emb = model.get_input_embeddings()
    vocab = emb.num_embeddings  # the ids only have to be valid for the embedding
    return ((torch.arange(8) * 7 + 3) % vocab).view(1, -1).to(emb.weight.device)  # [1, 8]


def check_gates(model: nn.Module, block_list: Sequence[Block]) -> str | None:
    """Check on the real model that gates on `block_list` are exact: all at 1 reproduce the logits and all
    at 0 make every block the identity (its output equals its input). None if so, else what failed.

    One forward pass of 8 tokens per setting, in eval mode without gradients.
    """
    ids = _probe_ids(model)
    seen: dict[int, list] = {}
    record = [False]

    def pre(index):
        def f(module, args, kwargs):
            if record[0]:
                seen[index] = [layer_input(args, kwargs).detach().clone(), None]
        return f

    def post(index):
        def f(module, args, output):
            if record[0] and index in seen:
                seen[index][1] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        return f

    was_training = model.training
    model.eval()
    handles = []
    try:
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            with GateManager(model, block_list) as gates:  # its hooks first: `post` sees the gated output
                for b in block_list:
                    handles += [b.module.register_forward_pre_hook(pre(b.index), with_kwargs=True),
                                b.module.register_forward_hook(post(b.index))]
                gates.set(torch.ones(gates.n_blocks))
                ones = model(input_ids=ids).logits
                gates.set(torch.zeros(gates.n_blocks))
                record[0] = True
                model(input_ids=ids)
    except Exception as exc:  # any model: the check must report, not crash
        return f"the check's forward pass failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not torch.allclose(ones, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max())):
        return f"gates at 1 change the logits by {float((ones - ref).abs().max()):.3g}"
    for b in block_list:
        inp, out = seen.get(b.index, (None, None))
        if inp is None or out is None or inp.shape != out.shape:
            return f"block {b.index}'s input and output hidden states could not be compared"
        if not torch.allclose(out, inp, rtol=1e-6, atol=1e-6 * (1 + float(inp.abs().max()))):
            return f"gates at 0 leave block {b.index} changing the hidden state by {float((out - inp).abs().max()):.3g}"
    return None
