"""Surgery for merged blocks: fold a window of consecutive blocks into its first block, then
remove the others, and save a normal Hugging Face checkpoint.

A merge group (a, a+1, ..., b) keeps block a (the anchor) with merged weights and removes
a+1..b. What is merged: every parameter of the block's residual branches (the modules the CBO
gates scale, from the architecture table: attention and MLP for Llama-like blocks). The block's
own normalization layers keep the anchor's values. Merge rules for a parameter theta:

    difference        theta_a + sum_{k=a+1..b} (theta_k - theta_a)
                      (the parameter consolidation of sliding-window merging, Ding et al. 2025,
                      taken from LaCo's differential merging; the default)
    reference-code    theta_b: what the published SWM script computes: its loop adds
                      (theta_k - theta_anchor) * 1 to the anchor IN PLACE, so each step overwrites
                      the anchor with theta_k and the last block's weights remain.

The result is a plain checkpoint with fewer blocks: `AutoModelForCausalLM.from_pretrained` loads
it, and `removal.json` records the groups and the rule.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cboprune.core.choices import DEFAULT_MERGE_RULE, MERGE_RULES
from cboprune.core.errors import CBOPruneError
from cboprune.models.architectures import blocks
from cboprune.models.surgery import remove_blocks, save_pruned, validate_removal
from cboprune.core.ranking import Candidate

log = logging.getLogger(__name__)



def validate_groups(groups: Sequence[Sequence[int]], n_blocks: int) -> list[tuple[int, ...]]:
    """Groups must be runs of >= 2 consecutive block indices inside the model, not overlapping."""
    out, seen = [], set()
    for g in groups:
        g = tuple(int(i) for i in g)
        if len(g) < 2 or list(g) != list(range(g[0], g[0] + len(g))):
            raise CBOPruneError(f"merge group {list(g)} must list at least two consecutive block indices, e.g. [4, 5, 6]")
        if g[0] < 0 or g[-1] >= n_blocks:
            raise CBOPruneError(f"merge group {list(g)} lies outside the model's blocks 0..{n_blocks - 1}")
        if seen & set(g):
            raise CBOPruneError(f"merge group {list(g)} overlaps another group: groups must be disjoint")
        seen |= set(g)
        out.append(g)
    return sorted(out)


def branch_parameters(model: nn.Module, index: int) -> dict[str, nn.Parameter]:
    """The parameters that a merge combines for block `index`, keyed by their name inside the block."""
    block = blocks(model)[index]
    out = {}
    for branch in block.branches:
        local = branch[len(block.name) + 1:]
        for name, p in model.get_submodule(branch).named_parameters():
            out[f"{local}.{name}"] = p
    return out


def merged_values(tensors: Sequence[torch.Tensor], rule: str = DEFAULT_MERGE_RULE) -> torch.Tensor:
    """Combine one parameter over a group (anchor first) by `rule` (see the module docstring)."""
    if rule not in MERGE_RULES:
        raise CBOPruneError(f"unknown merge rule {rule!r}: use one of {', '.join(MERGE_RULES)}")
    if rule == "reference-code":
        return tensors[-1].detach().clone()
    anchor = tensors[0].detach()
    out = anchor.clone()
    for t in tensors[1:]:
        out += t.detach() - anchor
    return out


def merged_state(model: nn.Module, group: Sequence[int], rule: str = DEFAULT_MERGE_RULE) -> dict[str, torch.Tensor]:
    """{name inside the block: merged tensor} for the anchor of `group` (nothing is modified)."""
    per_block = [branch_parameters(model, i) for i in group]
    names = list(per_block[0])
    for i, params in zip(group, per_block):
        if list(params) != names or any(params[k].shape != per_block[0][k].shape for k in names):
            raise CBOPruneError(f"blocks {list(group)} do not have identical parameters (block {i} differs): "
                                "only blocks of the same kind and shape can be merged")
    return {k: merged_values([params[k] for params in per_block], rule) for k in names}


def merge_blocks(model: nn.Module, groups: Sequence[Sequence[int]], rule: str = DEFAULT_MERGE_RULE) -> nn.Module:
    """In place: give each group's anchor the merged weights, then remove the other members."""
    n = len(blocks(model))
    groups = validate_groups(groups, n)
    states = [merged_state(model, g, rule) for g in groups]  # all from the unmodified weights
    with torch.no_grad():
        for g, state in zip(groups, states):
            params = branch_parameters(model, g[0])
            for k, v in state.items():
                params[k].copy_(v)
    drop = [i for g in groups for i in g[1:]]
    if drop:
        remove_blocks(model, drop)
    return model


def apply_candidate(model: nn.Module, candidate: Candidate, *, merge_rule: str = DEFAULT_MERGE_RULE) -> nn.Module:
    """In place: the surgery a ranked candidate asks for, merged groups and removed blocks alike.

    `candidate.removed` lists every block that disappears (original indices); for a merge group it
    holds the non-anchor members. Blocks removed outright are those not in any group."""
    n = len(blocks(model))
    groups = validate_groups(candidate.merged, n) if candidate.merged else []
    folded = {i for g in groups for i in g[1:]}
    removed = set(validate_removal(candidate.removed, n)) if candidate.removed else set()
    if not folded <= removed:
        raise CBOPruneError(f"candidate removes {sorted(removed)} but its merge groups fold {sorted(folded)}: "
                            "every non-anchor member of a group must be listed as removed")
    anchors = {g[0] for g in groups}
    if anchors & removed:
        raise CBOPruneError(f"merge anchors {sorted(anchors & removed)} are also listed as removed")
    if groups:
        # Merge first (indices still original), then remove the plain removals at their new positions.
        merge_blocks(model, groups, merge_rule)
        rest = sorted(removed - folded)
        if rest:
            shifted = [i - sum(1 for f in folded if f < i) for i in rest]
            remove_blocks(model, shifted)
    elif removed:
        remove_blocks(model, sorted(removed))
    return model


def save_candidate(model: nn.Module, tokenizer, candidate: Candidate, out_dir: str | Path, info: dict[str, Any], *,
                   merge_rule: str = DEFAULT_MERGE_RULE, copy_model: bool = True, overwrite: bool = False) -> Path:
    """Apply a candidate (removal and/or merging) to a copy of `model` and save_pretrained it with
    `removal.json` (which records the merge groups and the rule)."""
    pruned = copy.deepcopy(model) if copy_model else model
    apply_candidate(pruned, candidate, merge_rule=merge_rule)
    info = {**info, "merged": [list(g) for g in candidate.merged]}
    if candidate.merged:
        info["merge_rule"] = merge_rule
    return save_pruned(pruned, tokenizer, out_dir, info, overwrite=overwrite)


def apply_configuration(model: nn.Module, candidate: Candidate, merge_rule: str) -> nn.Module:
    """A pruned copy (removal or merging); the original stays intact for the next configuration."""

    pruned = copy.deepcopy(model)
    apply_candidate(pruned, candidate, merge_rule=merge_rule)
    return pruned


__all__ = ["DEFAULT_MERGE_RULE", "MERGE_RULES", "apply_candidate", "apply_configuration", "branch_parameters", "merge_blocks",
           "merged_state", "merged_values", "save_candidate", "validate_groups"]
