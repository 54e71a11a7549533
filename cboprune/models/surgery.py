"""Physically remove blocks and save a normal Hugging Face checkpoint.

The pruned model must reload with plain `AutoModelForCausalLM.from_pretrained` and generate with
its KV cache, so surgery rewrites the block count and every per-layer config list, and renumbers
every per-layer index attribute (`layer_idx` of attention, Mamba and cache-aware modules).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from cboprune.errors import CBOPruneError
from cboprune.models.architectures import count_field, decoder_layers, layer_fields

log = logging.getLogger(__name__)

# Attributes that hold a block's position in the stack; renumbered after removal.
_LAYER_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number")
REMOVAL_FILE = "removal.json"


def validate_removal(removed: Sequence[int], n_blocks: int) -> list[int]:
    removed = sorted({int(i) for i in removed})
    if not removed:
        raise CBOPruneError("no blocks to remove: pass at least one block index")
    if removed[0] < 0 or removed[-1] >= n_blocks:
        raise CBOPruneError(f"block indices must lie in 0..{n_blocks - 1}, got {removed}")
    if len(removed) >= n_blocks:
        raise CBOPruneError(f"cannot remove all {n_blocks} blocks: remove fewer than {n_blocks}")
    return removed


def _rewrite_config(config, kept: list[int], n_blocks: int) -> None:
    setattr(config, count_field(config), len(kept))
    listed = set(layer_fields(config))
    for name, value in list(vars(config).items()):
        if name in listed and isinstance(value, (list, tuple)) and len(value) == n_blocks:
            setattr(config, name, type(value)(value[i] for i in kept))
        elif isinstance(value, (list, tuple)) and len(value) == n_blocks and n_blocks > 1:
            log.warning("config field %r has one entry per block but is not declared as a per-layer "
                        "field; left unchanged (declare it in the architecture table if it is)", name)


def _renumber(layer: nn.Module, new_index: int) -> None:
    for module in layer.modules():
        for attr in _LAYER_INDEX_ATTRS:
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, new_index)


def remove_blocks(model: nn.Module, removed: Sequence[int]) -> nn.Module:
    """Remove blocks `removed` (original indices) from `model` in place and return it."""
    path, layers = decoder_layers(model)
    n_blocks = len(layers)
    removed = validate_removal(removed, n_blocks)
    kept = [i for i in range(n_blocks) if i not in set(removed)]
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_index, layer in enumerate(new_layers):
        _renumber(layer, new_index)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new_layers)
    _rewrite_config(model.config, kept, n_blocks)
    # Inner models (model.model) share the config object in transformers, but not always.
    inner_config = getattr(parent, "config", None)
    if inner_config is not None and inner_config is not model.config:
        _rewrite_config(inner_config, kept, n_blocks)
    return model


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, provenance: dict[str, Any],
                *, overwrite: bool = False) -> Path:
    """save_pretrained the (already pruned) model and tokenizer plus `removal.json`, atomically:
    everything is written into a temporary sibling directory that is renamed at the end."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CBOPruneError(f"output directory {out_dir} is not empty: choose another or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REMOVAL_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        tmp.chmod(0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
