"""The one place that knows model architectures: a declarative table keyed by `config.model_type`.

Each entry says where the decoder-layer list is, which submodules of a block write into the
residual stream (the branches the CBO gates scale), what kind of block it is, and which config
fields describe the layers and must be rewritten when blocks are removed. Unknown model types go
through a generic discovery of the decoder-layer `ModuleList` (logged once). Nothing else in
cboprune looks at model names.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

from torch import nn

from cboprune.errors import CBOPruneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """How to find and gate the blocks of one model family.

    layers: dotted attribute path from the *ForCausalLM module to the decoder-layer ModuleList.
    branches: submodule names inside one block whose outputs are added to the residual stream.
        When a family normalizes a branch output before the residual add (Gemma 2/3's
        post_*_layernorm), the branch to gate is that norm: RMSNorm(alpha * y) would undo alpha.
    block_kind: the kind of every block (attention, moe, mamba, ...).
    count_field: the config field holding the number of blocks.
    layer_fields: config fields holding one entry per block; entries of removed blocks are dropped.
    """

    layers: str = "model.layers"
    branches: tuple[str, ...] = ("self_attn", "mlp")
    block_kind: str = "attention"
    count_field: str = "num_hidden_layers"
    layer_fields: tuple[str, ...] = ("layer_types",)


_DENSE = ArchSpec()

# Adding a dense family whose blocks look like Llama's is one line here.
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _DENSE,
    "mistral": _DENSE,
    "qwen2": _DENSE,
    "qwen3": _DENSE,
}


@dataclass(frozen=True)
class Block:
    index: int
    name: str  # qualified module name, e.g. "model.layers.3"
    kind: str
    branches: tuple[str, ...]  # qualified names of the gated branch modules
    module: nn.Module


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


@cache
def _log_fallback_once(model_type: str, path: str) -> None:
    log.warning("model type %r is not in the architecture table; discovered its decoder layers at %r "
                "generically (add a table entry to make this explicit)", model_type, path)


def _discover_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the decoder-layer ModuleList: element class in `_no_split_modules`, length = layer count."""
    config = model.config
    n_layers = getattr(config, "num_hidden_layers", None)
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            cls = type(module[0]).__name__
            score = (cls in no_split) * 2 + (n_layers is not None and len(module) == n_layers)
            if score:
                candidates.append((score, len(module), name, module))
    if not candidates:
        raise CBOPruneError(f"cannot find the decoder layers of model type {config.model_type!r}: "
                            "add an entry for it to cboprune/models/architectures.py")
    candidates.sort(key=lambda c: (-c[0], -c[1]))
    return candidates[0][2], candidates[0][3]


def arch_spec(model: nn.Module) -> ArchSpec | None:
    return ARCHITECTURES.get(getattr(model.config, "model_type", ""))


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks."""
    spec = arch_spec(model)
    if spec is not None:
        layers = _get_submodule(model, spec.layers)
        if isinstance(layers, nn.ModuleList):
            return spec.layers, layers
    path, layers = _discover_layers(model)
    _log_fallback_once(model.config.model_type, path)
    return path, layers


def blocks(model: nn.Module) -> list[Block]:
    """The model's decoder blocks in order, with kind and the branch modules to gate."""
    spec = arch_spec(model) or _DENSE
    path, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        branches = tuple(b for b in spec.branches if _get_submodule(layer, b) is not None)
        if not branches:
            raise CBOPruneError(
                f"block {path}.{i} of model type {model.config.model_type!r} has none of the residual "
                f"branches {spec.branches}: add an entry for this type to cboprune/models/architectures.py")
        out.append(Block(index=i, name=f"{path}.{i}", kind=spec.block_kind,
                         branches=tuple(f"{path}.{i}.{b}" for b in branches), module=layer))
    return out


def count_field(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    spec = ARCHITECTURES.get(getattr(config, "model_type", ""), _DENSE)
    return spec.count_field


def layer_fields(config) -> tuple[str, ...]:
    spec = ARCHITECTURES.get(getattr(config, "model_type", ""), _DENSE)
    return spec.layer_fields


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: nn.Module) -> list[dict]:
    """One row per block for reports: index, name, kind, parameters."""
    return [{"index": b.index, "name": b.name, "kind": b.kind, "params": num_parameters(b.module)}
            for b in blocks(model)]


__all__ = ["ARCHITECTURES", "ArchSpec", "Block", "blocks", "decoder_layers", "describe"]
