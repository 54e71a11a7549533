"""Checkpoints that ship: the save dtype (source's by default) and the Hugging Face model card."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from cboprune.models.card import read_card_metadata, render_model_card, resolve_save_dtype, source_dtype
from cboprune.models.surgery import remove_blocks, save_pruned
from conftest import tiny_llama


def _tied_tiny(n_layers: int = 6):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _provenance(source: str, removed=(1, 3)) -> dict:
    return {"cboprune_version": "0.1.0", "source_model": source, "method": "cbo", "n_blocks_original": 6,
            "removed": list(removed), "removed_kinds": ["attention+mlp"] * len(removed), "state_rank": 0,
            "energy_model": "fisher", "energy": 0.125}


def test_save_keeps_the_source_dtype_and_leaves_the_model_alone(tmp_path):
    from transformers import AutoModelForCausalLM

    source = tmp_path / "source"
    _tied_tiny().to(torch.bfloat16).save_pretrained(source)  # a bfloat16 checkpoint, as on the hub
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)  # computed in float32
    pruned = remove_blocks(copy.deepcopy(model), [1, 3])
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    out = save_pruned(pruned, None, tmp_path / "pruned", _provenance(str(source)))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert reloaded.dtype == torch.bfloat16 and reloaded.config.num_hidden_layers == 4
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # still tied
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, before[key].to(torch.bfloat16)), key
    assert all(torch.equal(v, before[k]) and v.dtype == torch.float32 for k, v in pruned.state_dict().items())
    half = (out / "model.safetensors").stat().st_size
    full = save_pruned(pruned, None, tmp_path / "fp32", _provenance(str(source)), save_dtype="float32")
    assert AutoModelForCausalLM.from_pretrained(full, dtype="auto").dtype == torch.float32
    assert half < 0.55 * (full / "model.safetensors").stat().st_size


def test_save_dtype_choices(tmp_path):
    model = tiny_llama()
    assert source_dtype("default") == torch.bfloat16 and source_dtype("x/model.gguf") == torch.bfloat16
    assert resolve_save_dtype("float16", model, {}) == torch.float16
    assert resolve_save_dtype(None, model, {"source_model": "/no/such/dir"}) == torch.float32  # unknown: own
    from cboprune.core.errors import CBOPruneError

    with pytest.raises(CBOPruneError, match="unknown dtype"):
        resolve_save_dtype("int2", model, {})


def test_model_card_front_matter_and_body(tmp_path):
    model = remove_blocks(tiny_llama(), [1, 3])
    prov = {**_provenance("default"), "command": "cboprune prune --model default --blocks 1,3 --output-dir x",
            "evaluation": {"arc_easy": {"acc": 0.5, "acc_norm": 0.25}},
            "speedup": {"prefill_speedup": 1.21, "decode_speedup": 1.3, "device": "cpu"}}
    out = save_pruned(model, None, tmp_path / "ck", prov, save_dtype="float32")
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta == read_card_metadata(out / "README.md")
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "transformers" and {"pruning", "cboprune"} <= set(meta["tags"])
    per_block = sum(p.numel() for p in model.model.layers[0].parameters())
    after = sum(p.numel() for p in model.parameters())
    assert "blocks (original indices): 1, 3" in text and "method: cbo" in text and "2 × attention+mlp" in text
    assert "constrained binary optimization" in text
    assert f"{(after + 2 * per_block) / 1e6:.2f} M → {after / 1e6:.2f} M" in text
    assert "| arc_easy | acc | 0.5 |" in text and "1.21×" in text and "--blocks 1,3" in text
    assert "from_pretrained" in text and "saved in float32" in text


def test_card_of_a_local_source_has_no_base_model_but_keeps_its_license(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# a model\n")
    meta = read_card_metadata_from(render_model_card(_provenance(str(src))))
    assert meta["license"] == "mit" and "base_model" not in meta
    assert read_card_metadata_from(render_model_card(_provenance("org/name")))["base_model"] == "org/name"


def read_card_metadata_from(text: str) -> dict:
    return yaml.safe_load(text.split("---\n")[1])
