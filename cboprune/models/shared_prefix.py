"""Configuration losses that share their first blocks: the hidden state entering a block is computed
once for every configuration that keeps all blocks before it, instead of once per configuration.

Configurations are sorted removal tuples, arranged as a trie. A run of the model for the prefix P
(blocks P off) starts from the hidden state entering its first block (injected by a pre-hook on a
temporarily shortened layer list, so the model's own forward still builds masks, position
embeddings, the final norm and the head), captures the states entering the blocks where its
children branch off, and stops early (a pre-hook raises) when P itself is not a configuration. A
child P + (j,) starts at block j + 1 from the state captured at block j, which is exact because a
switched-off block is the identity (`gating.check_gates`).

For the 1 + N + N(N-1)/2 configurations of the measured energy (N = 30) this evaluates about a third
of the decoder-layer work of one full forward pass per configuration; the head runs once per
configuration either way.

Models whose forward does not survive the shortened layer list (one that indexes per-layer config
by position, say; lists of per-layer config values are shortened with it) are detected by comparing both evaluations on the first batch; those fall back
to the plain evaluation. Memory: at most (depth of the trie) x N hidden states of one batch.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from cboprune.models.forward_loss import sample_losses
from cboprune.models.architectures import decoder_config

log = logging.getLogger(__name__)

Config = tuple[int, ...]

# Whether the shortened-layer-list evaluation matched the plain one, per model (checked once).
_VERDICT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Stop(Exception):
    """Raised by a pre-hook once a run has captured every state it was asked for."""


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner, _, attr = path.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


def _branch(group: list[Config], depth: int) -> tuple[bool, dict[int, list[Config]]]:
    """For a trie node at `depth`: is the node itself a configuration, and its children by next block."""
    children: dict[int, list[Config]] = {}
    for c in group:
        if len(c) > depth:
            children.setdefault(c[depth], []).append(c)
    return any(len(c) == depth for c in group), children


def layer_cost(configs: Sequence[Config], n: int) -> tuple[int, int]:
    """(decoder-layer evaluations with prefix sharing, without), for planning and the benchmark."""
    shared = 0

    def walk(prefix_len: int, start: int, group: list[Config]) -> None:
        nonlocal shared
        here, children = _branch(group, prefix_len)
        later = [j for j in children if j > start]
        if here:
            shared += n - start
        elif later:
            shared += max(later) - start
        for j, sub in children.items():
            walk(prefix_len + 1, j + 1 if j + 1 < n else j, sub)

    unique = sorted(set(configs))
    walk(0, 0, unique)
    return shared, n * len(unique)


class PrefixEvaluator:
    """Per-sample losses of many configurations on one batch, sharing prefixes (see the module doc).

    model: gated by `gates` (a GateManager); layers: the decoder-layer ModuleList at `path`.
    """

    def __init__(self, model: nn.Module, gates, path: str, layers: nn.ModuleList):
        self.model, self.gates, self.layers = model, gates, layers
        self.n = len(layers)
        self.parent, self.attr = _parent(model, path)
        self.config = decoder_config(model)
        self.inject: tuple[int, torch.Tensor] | None = None
        self.capture: set[int] = set()
        self.stop_at: int | None = None
        self.captured: dict[int, torch.Tensor] = {}
        self._handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, layer in enumerate(layers)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        setattr(self.parent, self.attr, self.layers)

    def _hook(self, index: int):
        def pre(module, args, kwargs):
            if self.inject is not None and self.inject[0] == index:
                state = self.inject[1]
                if args:
                    args = (state, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": state}
            if index in self.capture:
                h = args[0] if args else kwargs["hidden_states"]
                self.captured[index] = h.clone()
            if self.stop_at == index:
                raise _Stop
            return args, kwargs
        return pre

    def _run(self, ids, mask, start: int, state: torch.Tensor | None, removed: Config, capture: set[int],
             need_logits: bool) -> torch.Tensor | None:
        """One forward from block `start` (state = the hidden state entering it; None at 0) with
        `removed` off; fills self.captured for `capture`; per-sample loss when need_logits."""
        self.capture, self.captured = set(capture), {}
        self.stop_at = None if need_logits else max(capture)
        self.inject = (start, state) if start > 0 else None
        self.gates.set(self.gates.removal_gates(list(removed)) if removed else None)
        per_layer = {}
        if start > 0:
            setattr(self.parent, self.attr, nn.ModuleList(list(self.layers)[start:]))
            # Per-layer config lists (layer_types, ...) read by position must shorten with the layers.
            per_layer = {k: v for k, v in vars(self.config).items()
                         if isinstance(v, (list, tuple)) and len(v) == self.n}
            for k, v in per_layer.items():
                setattr(self.config, k, type(v)(v[start:]))
        try:
            return sample_losses(self.model, ids, mask)
        except _Stop:
            return None
        finally:
            if start > 0:
                setattr(self.parent, self.attr, self.layers)
                for k, v in per_layer.items():
                    setattr(self.config, k, v)
            self.inject, self.stop_at, self.capture = None, None, set()

    def losses(self, ids, mask, configs: Sequence[Config]) -> dict[Config, torch.Tensor]:
        """{configuration: per-sample loss [B]} for the batch (ids, mask)."""
        out: dict[Config, torch.Tensor] = {}
        self._solve(ids, mask, (), 0, None, sorted(set(configs)), out)
        return out

    def _solve(self, ids, mask, prefix: Config, start: int, state, group: list[Config], out) -> None:
        # Every configuration in `group` removes exactly `prefix` below block `start`.
        here, children = _branch(group, len(prefix))
        # At the root there is no state yet: even block 0's entering state comes from a run.
        later = {j for j in children if j > start or state is None}
        captured: dict[int, torch.Tensor] = {}
        if here or later:
            loss = self._run(ids, mask, start, state, prefix, later, need_logits=here)
            captured = self.captured
            if here:
                out[prefix] = loss
        for j in sorted(children):
            entering = captured.pop(j) if j in captured else state  # the state entering block j, prefix off
            # Block j off is the identity, so the child starts at j + 1 from the same state; the
            # last block has no successor to inject into, so there the child runs it switched off.
            nxt = j + 1 if j + 1 < self.n else j
            self._solve(ids, mask, prefix + (j,), nxt, entering if nxt > 0 else None, children[j], out)


def check_prefix_reuse(model: nn.Module, evaluator: PrefixEvaluator, ids, mask, configs: Sequence[Config],
                       plain) -> bool:
    """Once per model: do shared-prefix losses equal plain ones on this batch? `plain(configs)` gives
    the plain per-sample losses [C, B]. False (the plain evaluation) on any mismatch or error."""
    verdict = _VERDICT.get(model)
    if verdict is not None:
        return verdict
    # The deepest starts and the longest configuration exercise injection, capture and the early stop.
    probe = sorted(set(configs), key=lambda c: (-(c[-1] if c else -1), -len(c)))[:3]
    probe = sorted(set(probe) | {max(configs, key=len)})
    try:
        shared = evaluator.losses(ids, mask, probe)
        ref = plain(probe)
        diff = max(float((shared[c] - ref[k]).abs().max()) for k, c in enumerate(probe))
        verdict = diff <= 1e-5 * (1.0 + float(ref.abs().max()))
        if not verdict:
            log.info("prefix reuse off for this model: shared-prefix losses differ from plain ones by %.3g", diff)
    except Exception as exc:  # any model: an unsupported forward means the plain evaluation, not a crash
        message = str(exc).splitlines()[0] if str(exc) else ""
        log.info("prefix reuse off for this model: %s: %s", type(exc).__name__, message)
        verdict = False
    _VERDICT[model] = verdict
    return verdict
