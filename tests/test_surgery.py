"""Pruned checkpoints: config rewritten, layer_idx renumbered, reload and generate with the cache."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cboprune.core.errors import CBOPruneError
from cboprune.models.architectures import blocks, decoder_layers
from cboprune.models.surgery import REMOVAL_FILE, remove_blocks, save_pruned


def test_pruned_checkpoint_reloads_and_generates_with_cache(tiny_model, tmp_path):
    removed = [1, 2, 5]
    remove_blocks(tiny_model, removed)
    assert [layer.self_attn.layer_idx for layer in tiny_model.model.layers] == [0, 1, 2]
    out = save_pruned(tiny_model, None, tmp_path / "ck", {"removed": removed})
    assert json.loads((out / REMOVAL_FILE).read_text())["removed"] == removed
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 3
    assert len(decoder_layers(model)[1]) == 3
    ids = torch.tensor([[5, 17, 42, 7]])
    with_cache = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                use_cache=True, pad_token_id=0)
    without_cache = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                   use_cache=False, pad_token_id=0)
    assert with_cache.shape == (1, 12)
    assert torch.equal(with_cache, without_cache)


def test_per_layer_config_lists_are_rewritten(tiny_model):
    tiny_model.config.layer_types = [f"full_attention_{i}" for i in range(6)]
    remove_blocks(tiny_model, [0, 4])
    assert tiny_model.config.layer_types == ["full_attention_1", "full_attention_2", "full_attention_3",
                                             "full_attention_5"]


@pytest.mark.parametrize("removed", [[], [6], [-1], list(range(6))])
def test_invalid_removals_are_refused(tiny_model, removed):
    with pytest.raises(CBOPruneError):
        remove_blocks(tiny_model, removed)


def test_save_refuses_non_empty_directory_and_leaves_nothing_behind(tiny_model, tmp_path):
    target = tmp_path / "ck"
    target.mkdir()
    (target / "keep.txt").write_text("user file")
    with pytest.raises(CBOPruneError):
        save_pruned(tiny_model, None, target, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]


def test_blocks_are_discovered_with_branches(tiny_model):
    found = blocks(tiny_model)
    assert len(found) == 6
    assert found[3].branches == ("model.layers.3.self_attn", "model.layers.3.mlp")
    assert {b.kind for b in found} == {"attention"}
