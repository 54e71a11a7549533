"""Physically remove blocks and save a normal Hugging Face checkpoint.

The pruned model must reload with plain `AutoModelForCausalLM.from_pretrained` and generate with
its KV cache, so surgery rewrites the block count and every per-layer config list, and renumbers
every per-layer index attribute (`layer_idx` of attention, Mamba and cache-aware modules).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from cboprune.core.errors import CBOPruneError
from cboprune.core.outputs import check_output_dir, dumps_strict, staged_dir
from cboprune.models.architectures import (
    MOE_LAYOUTS,
    ArchSpec,
    block_kinds,
    decoder_config,
    resolve,
)
from cboprune.models.card import save_weights, write_model_card

log = logging.getLogger(__name__)

# Attributes that hold a block's position in the stack (attention `layer_idx`, Mamba cache indices);
# renumbered after removal, keeping any offset (a 1-based `layer_number` stays 1-based).
_LAYER_INDEX_ATTRS = ("layer_idx", "layer_id", "layer_number", "layer_index")
REMOVAL_FILE = "removal.json"


class UnsupportedRemoval(CBOPruneError):
    """The model's config cannot describe the layers left after this removal."""


def validate_removal(removed: Sequence[int], n_blocks: int) -> list[int]:
    """The block indices to remove, sorted; refuses duplicates, indices outside 0..N-1 and removing all."""
    given = [int(i) for i in removed]
    duplicates = sorted({i for i in given if given.count(i) > 1})
    if duplicates:
        raise CBOPruneError(f"block {', '.join(map(str, duplicates))} is listed more than once: list each block to "
                            "remove once")
    removed = sorted(given)
    if not removed:
        raise CBOPruneError("no blocks to remove: pass at least one block index")
    if removed[0] < 0 or removed[-1] >= n_blocks:
        raise CBOPruneError(f"block indices must lie in 0..{n_blocks - 1}, got {removed}")
    if len(removed) >= n_blocks:
        raise CBOPruneError(f"cannot remove all {n_blocks} blocks: remove fewer than {n_blocks}")
    return removed


# --- relayouts: configs that express the layer layout by a formula -------------------------------------
def _relayout_sparse_step(old: Any, new: Any, kept: list[int]) -> tuple[str, ...]:
    """Qwen-MoE: make the MoE layout explicit (`decoder_sparse_step` 1, dense layers in `mlp_only_layers`)."""
    moe = [MOE_LAYOUTS["sparse_step"](old, i) for i in kept]
    new.decoder_sparse_step = 1
    new.mlp_only_layers = [j for j, is_moe in enumerate(moe) if not is_moe]
    return ("decoder_sparse_step", "mlp_only_layers")


def _fit_period(pattern: list[bool]) -> tuple[int, int] | None:
    """(period, offset) with pattern[i] == (i % period == offset) for all i, smallest period first."""
    n = len(pattern)
    if not any(pattern):
        return n + 1, n  # offset n is never reached
    for period in range(1, n + 1):
        for offset in range(period):
            if all(p == (i % period == offset) for i, p in enumerate(pattern)):
                return period, offset
    return None


def _relayout_periods(old: Any, new: Any, kept: list[int]) -> tuple[str, ...]:
    """Jamba: attention and expert layers are every `*_layer_period`-th from `*_layer_offset`; refit both."""
    attention = [old.layers_block_type[i] == "attention" for i in kept]
    experts = [old.layers_num_experts[i] > 1 for i in kept]
    changed = []
    for prefix, pattern in (("attn_layer", attention), ("expert_layer", experts)):
        fit = _fit_period(pattern)
        if fit is None:
            shown = "".join("x" if p else "." for p in pattern)
            raise UnsupportedRemoval(
                f"model type {old.model_type!r} describes its {prefix.split('_')[0]} layers by "
                f"{prefix}_period/{prefix}_offset ({getattr(old, prefix + '_period')}/"
                f"{getattr(old, prefix + '_offset')}); after this removal they would sit at {shown!r} "
                f"(x = {prefix.split('_')[0]} layer), which no period and offset describe, so a reloaded "
                f"checkpoint would rebuild different layers. Remove blocks so that the pattern stays periodic "
                f"(for example whole periods), or restrict removal with --only/--keep")
        setattr(new, f"{prefix}_period", fit[0])
        setattr(new, f"{prefix}_offset", fit[1])
        changed += [f"{prefix}_period", f"{prefix}_offset"]
    return tuple(changed)


def _relayout_first_k_dense(old: Any, new: Any, kept: list[int]) -> tuple[str, ...]:
    """DeepSeek-V3 style: `first_k_dense_replace` = number of dense layers left (they stay a prefix)."""
    new.first_k_dense_replace = sum(1 for i in kept if not MOE_LAYOUTS["first_k_dense"](old, i))
    return ("first_k_dense_replace",)


#: Named rewrites for layouts given by a formula; `ArchSpec.relayouts` refers to them by name.
RELAYOUTS: dict[str, Callable[[Any, Any, list[int]], tuple[str, ...]]] = {
    "sparse_step": _relayout_sparse_step,
    "periods": _relayout_periods,
    "first_k_dense": _relayout_first_k_dense,
}


def _rewrite_config(config: Any, spec: ArchSpec, kept: list[int], n_blocks: int) -> list[str]:
    """Rewrite `config` in place for the blocks `kept`; return the names of the fields it set."""
    old = copy.deepcopy(config)
    pos = {i: j for j, i in enumerate(kept)}
    changed: list[str] = []
    for name in spec.layer_fields:  # per-layer lists and pattern strings
        value = getattr(old, name, None)
        if isinstance(value, (list, tuple, str)) and len(value) == n_blocks:
            entries = [value[i] for i in kept]
            setattr(config, name, "".join(entries) if isinstance(value, str) else type(value)(entries))
            changed.append(name)
        elif value is not None and isinstance(value, (list, tuple, str)):
            raise CBOPruneError(f"config field {name!r} of model type {old.model_type!r} should have one entry per "
                                f"block ({n_blocks}) but has {len(value)}")
    for name in spec.index_fields:  # lists of layer indices
        value = getattr(old, name, None)
        if isinstance(value, (list, tuple)):
            setattr(config, name, type(value)(pos[i] for i in value if i in pos))
            changed.append(name)
    for name in spec.count_fields:
        setattr(config, name, len(kept))
        changed.append(name)
    for relayout in spec.relayouts:
        changed += RELAYOUTS[relayout](old, config, kept)
    if getattr(old, "is_heterogeneous", False):  # transformers' sparse per-layer overrides, keyed by index
        overrides = old._heterogeneity_spec.per_layer_overrides
        config.per_layer_config = {pos[i]: copy.deepcopy(v) for i, v in overrides.items() if i in pos} or None
        changed.append("per_layer_config")
    declared = set(changed) | {spec.kinds.field}
    for name, value in vars(old).items():
        if (name not in declared and not name.startswith("_") and isinstance(value, (list, tuple))
                and len(value) == n_blocks and n_blocks > 2):
            log.warning("config field %r has one entry per block but is not declared as a per-layer field of "
                        "model type %r; left unchanged (declare it in the architecture table if it is)",
                        name, old.model_type)
    return changed


def plan_removal(model: nn.Module, removed: Sequence[int]) -> tuple[list[int], Any]:
    """Check that `removed` can be removed from `model` and return (kept indices, rewritten config copy).

    Raises CBOPruneError for invalid indices and UnsupportedRemoval when the family's config cannot
    describe the remaining layers (the check runs on a copy: the model is left untouched).
    """
    spec, _, layers = resolve(model)
    n_blocks = len(layers)
    removed = validate_removal(removed, n_blocks)
    kept = [i for i in range(n_blocks) if i not in set(removed)]
    config = decoder_config(model)
    before = block_kinds(config, spec, n_blocks)
    planned = copy.deepcopy(config)
    _rewrite_config(planned, spec, kept, n_blocks)
    after = block_kinds(planned, spec, len(kept))
    expected = [before[i] for i in kept]
    if after != expected:
        bad = next(j for j, (a, e) in enumerate(zip(after, expected)) if a != e)
        raise UnsupportedRemoval(
            f"model type {config.model_type!r}: after removing {removed} the rewritten config would rebuild block "
            f"{kept[bad]} (new index {bad}) as {after[bad]!r} instead of {expected[bad]!r}; its layer layout "
            f"cannot express this removal (see docs/architectures.md)")
    stateful = {"mamba", "linear_attention", "conv"}
    had_attention = any("attention" in k.split("+") or "sliding_attention" in k.split("+") for k in before)
    if had_attention and not any({"attention", "sliding_attention"} & set(k.split("+")) for k in expected) and any(
            stateful & set(k.split("+")) for k in expected):
        log.warning("removing %s leaves no attention block in this hybrid model: transformers' generate() may fail "
                    "(its hybrid cache reads the sequence length from attention layers)", removed)
    return kept, planned


def _renumber(layer: nn.Module, old_index: int, new_index: int) -> None:
    for module in layer.modules():
        for attr in _LAYER_INDEX_ATTRS:
            value = getattr(module, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(module, attr, value - old_index + new_index)


def remove_blocks(model: nn.Module, removed: Sequence[int]) -> nn.Module:
    """Remove blocks `removed` (original indices) from `model` in place and return it.

    Rewrites the block count, per-layer config fields, layer-index lists and formula layouts of the
    model's (text) config, and renumbers `layer_idx` (attention KV cache, Mamba conv/SSM cache) and
    similar attributes, so the model runs with its cache and saves a checkpoint that reloads.
    """
    spec, path, layers = resolve(model)
    n_blocks = len(layers)
    kept, planned = plan_removal(model, removed)
    new_layers = nn.ModuleList([layers[i] for i in kept])
    for new_index, old_index in enumerate(kept):
        _renumber(layers[old_index], old_index, new_index)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new_layers)
    configs = [decoder_config(model)]
    # Inner models (model.model) share the config object in transformers, but not always.
    inner = getattr(parent, "config", None)
    if inner is not None:
        inner = decoder_config(inner)
        if all(inner is not c for c in configs):
            configs.append(inner)
    for config in configs:
        _rewrite_config(config, spec, kept, n_blocks)
    return model


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, provenance: dict[str, Any],
                *, overwrite: bool = False, save_dtype: str | None = None) -> Path:
    """save_pretrained the (already pruned) model and tokenizer plus `removal.json` and a model card,
    atomically, in the source model's dtype unless `save_dtype` says otherwise.

    Everything is written into a staging directory next to `out_dir` that is renamed at the end
    (`cboprune.core.outputs.staged_dir`): an exception or Ctrl-C leaves nothing, a SIGKILL leaves a
    staging directory that the next run for `out_dir` removes. removal.json is strict JSON: a
    score that is not a number (a manual `--blocks` removal has no energy) is written as null.
    """
    out_dir = check_output_dir(out_dir, overwrite)
    dumps_strict(provenance)  # before the save: a bad value fails at once
    with staged_dir(out_dir, overwrite=overwrite) as stage:
        write_checkpoint(model, tokenizer, stage, provenance, save_dtype)
    return out_dir


def write_checkpoint(model: nn.Module, tokenizer, directory: Path, provenance: dict[str, Any],
                     save_dtype: str | None = None) -> None:
    """The checkpoint's files (weights, tokenizer, removal.json, model card) into `directory`, which
    the caller stages (`outputs.staged_dir`)."""
    dtype = save_weights(model, directory, provenance, save_dtype)  # source dtype unless save_dtype says
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    (directory / REMOVAL_FILE).write_text(dumps_strict(provenance, indent=2) + "\n", encoding="utf-8")
    write_model_card(directory, provenance, model, dtype=dtype)
