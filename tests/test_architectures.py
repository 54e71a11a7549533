"""Every family in the architecture table, on tiny random models built offline from config classes.

For each family: gates at 1 reproduce the logits exactly; gates of a non-contiguous block set S
(one block of each kind the model has) at 0 equal the logits of the surgically pruned, saved and
reloaded checkpoint; the reloaded model generates with its cache; the saved config describes the
remaining blocks; the Hessian pass runs. Plus block kinds, `--only`, the fallback and errors, and the
checked generic fallback on families outside the table (OPT, GPT-J, BLOOM).
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cboprune.data.calibration import CalibrationSet
from cboprune.core.errors import CBOPruneError
from cboprune.models.gating import GateManager
from cboprune.selection.hessian import compute_gate_gradients
from cboprune.models import architectures as arch
from cboprune.models.architectures import (
    ARCHITECTURES,
    block_kinds,
    blocks,
    removable_blocks,
)
from cboprune.models.surgery import (
    UnsupportedRemoval,
    plan_removal,
    remove_blocks,
    save_pruned,
)

VOCAB = 128
BASE: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                            num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
SLIDING = dict(sliding_window=4)  # shorter than the test sequences, so sliding layers differ from full ones
MAMBA = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
             mamba_chunk_size=8)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


@dataclass(frozen=True)
class Family:
    model_type: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    n_layers: int = 6
    removed: tuple[int, ...] | None = None  # None: one block of each kind, non-contiguous
    kinds: frozenset[str] | None = None  # the kinds the tiny model must have (None: not checked)


F = Family
FAMILIES = [
    # dense
    F("llama"), F("mistral", SLIDING), F("qwen2", dict(SLIDING, use_sliding_window=True, max_window_layers=3),
                                         kinds=frozenset({"attention", "sliding_attention"})),
    F("qwen3", dict(SLIDING, head_dim=16, use_sliding_window=True, max_window_layers=2),
      kinds=frozenset({"attention", "sliding_attention"})),
    F("gemma", dict(head_dim=16)), F("gemma2", dict(SLIDING, head_dim=16), kinds=frozenset({"attention", "sliding_attention"})),
    F("gemma3_text", dict(SLIDING, head_dim=16, sliding_window_pattern=3), kinds=frozenset({"attention", "sliding_attention"})),
    F("phi3"), F("gpt2", dict(n_embd=32, n_layer=6, n_head=2, n_positions=64)), F("gpt_neox"), F("olmo2"), F("granite"),
    F("phi"), F("olmo"), F("olmo3", SLIDING, kinds=frozenset({"attention", "sliding_attention"})), F("cohere"),
    F("cohere2", SLIDING, kinds=frozenset({"attention", "sliding_attention"})), F("stablelm"), F("starcoder2"),
    F("smollm3"), F("glm"), F("glm4"), F("helium", dict(head_dim=16)),
    F("exaone4", SLIDING, kinds=frozenset({"attention", "sliding_attention"})), F("seed_oss"), F("arcee"),
    F("apertus"), F("internlm3"), F("ernie4_5"), F("hunyuan_v1_dense", dict(head_dim=16)), F("nemotron"),
    # mixtures of experts
    F("mixtral", dict(num_local_experts=4, num_experts_per_tok=2), kinds=frozenset({"attention+moe"})),
    F("qwen2_moe", dict(MOE, shared_expert_intermediate_size=32, decoder_sparse_step=2),
      kinds=frozenset({"attention", "attention+moe"})),
    F("qwen3_moe", dict(MOE, head_dim=16, mlp_only_layers=[1, 4]), kinds=frozenset({"attention", "attention+moe"})),
    F("olmoe", dict(num_experts=4, num_experts_per_tok=2), kinds=frozenset({"attention+moe"})),
    F("phimoe", dict(num_local_experts=4, num_experts_per_tok=2), kinds=frozenset({"attention+moe"})),
    F("gpt_oss", dict(SLIDING, num_local_experts=4, num_experts_per_tok=2, head_dim=16),
      kinds=frozenset({"attention+moe", "sliding_attention+moe"})),
    F("granitemoe", dict(num_local_experts=4, num_experts_per_tok=2), kinds=frozenset({"attention+moe"})),
    F("deepseek_v3", dict(num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1,
                          topk_group=1, first_k_dense_replace=2, kv_lora_rank=16, q_lora_rank=16,
                          qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1),
      kinds=frozenset({"attention", "attention+moe"})),
    # hybrids
    F("jamba", dict(num_experts=4, num_experts_per_tok=2, attn_layer_period=4, attn_layer_offset=1,
                    expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8), n_layers=8,
      removed=(0, 1, 3, 4, 6, 7), kinds=frozenset({"mamba", "attention+moe", "mamba+moe"})),
    F("bamba", dict(MAMBA, attn_layer_indices=[1, 4]), kinds=frozenset({"attention", "mamba"})),
    F("falcon_h1", dict(MAMBA, mamba_d_ssm=64), kinds=frozenset({"attention+mamba"})),
    F("nemotron_h", dict(MAMBA, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                         moe_shared_expert_intermediate_size=32, ssm_state_size=8, n_groups=1, chunk_size=8,
                         expand=2, mamba_num_heads=4, mamba_head_dim=16,
                         layers_block_type=["mamba", "moe", "attention", "moe", "mamba", "mlp", "attention", "moe"]),
      n_layers=8, kinds=frozenset({"mamba", "moe", "attention", "mlp"})),
    F("granitemoehybrid", dict(MAMBA, num_local_experts=4, num_experts_per_tok=2,
                               layer_types=["mamba", "attention", "mamba", "mamba", "attention", "mamba"]),
      kinds=frozenset({"mamba+moe", "attention+moe"})),
    F("qwen3_next", dict(MOE, head_dim=16, shared_expert_intermediate_size=32, linear_num_value_heads=2,
                         linear_num_key_heads=1, linear_key_head_dim=8, linear_value_head_dim=8, mlp_only_layers=[1],
                         layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention",
                                      "full_attention", "linear_attention"]),
      kinds=frozenset({"linear_attention+moe", "linear_attention", "attention+moe"})),
    F("mamba", dict(state_size=8, expand=2, conv_kernel=4), kinds=frozenset({"mamba"})),
    F("mamba2", dict(state_size=8, expand=2, num_heads=4, head_dim=16, n_groups=1, chunk_size=8),
      kinds=frozenset({"mamba"})),
    F("falcon_mamba", dict(state_size=8, expand=2, conv_kernel=4), kinds=frozenset({"mamba"})),
    F("lfm2", dict(layer_types=["conv", "full_attention", "conv", "conv", "full_attention", "conv"], conv_L_cache=3),
      kinds=frozenset({"attention", "conv"})),
]
BY_TYPE = {f.model_type: f for f in FAMILIES}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, above all on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@cache
def _built(model_type: str) -> torch.nn.Module:
    fam = BY_TYPE[model_type]
    kwargs = dict(BASE, num_hidden_layers=fam.n_layers, **fam.kwargs)
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny(model_type: str) -> torch.nn.Module:
    """A fresh copy of the family's tiny random model (built once per session)."""
    return copy.deepcopy(_built(model_type))


def _ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _pick_removed(kinds: list[str]) -> list[int]:
    """One block of each kind, interior and non-adjacent where possible, forming a non-contiguous set."""
    n = len(kinds)
    chosen: list[int] = []
    for kind in dict.fromkeys(kinds):
        cands = [i for i, k in enumerate(kinds) if k == kind]
        cands.sort(key=lambda i: (any(abs(i - j) <= 1 for j in chosen), i == 0))
        chosen.append(cands[0])
    while len(chosen) < 2 or max(chosen) - min(chosen) + 1 == len(chosen):
        chosen.append(next(i for i in range(n) if all(abs(i - j) > 1 for j in chosen)))
    if len(chosen) > n - 2:
        raise AssertionError(f"tiny model too small for {kinds}")
    return sorted(chosen)


@pytest.fixture(params=[f.model_type for f in FAMILIES])
def family(request) -> Family:
    return BY_TYPE[request.param]


def test_every_table_entry_is_tested():
    assert sorted(ARCHITECTURES) == sorted(BY_TYPE)


def test_gates_at_one_reproduce_the_model(family):
    model = tiny(family.model_type)
    found = blocks(model)
    assert len(found) == family.n_layers
    kinds = [b.kind for b in found]
    spec = ARCHITECTURES[family.model_type]
    assert set(kinds) <= set(spec.block_kinds), (kinds, spec.block_kinds)
    if family.kinds is not None:
        assert set(kinds) == family.kinds
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        with GateManager(model, blocks(model)) as gates:
            gates.set(torch.ones(gates.n_blocks))
            shared = model(ids).logits
            gates.set(torch.ones(ids.shape[0], gates.n_blocks))
            per_sample = model(ids).logits
    assert (shared - ref).abs().max() <= 1e-6
    assert (per_sample - ref).abs().max() <= 1e-6


def test_gates_at_zero_equal_the_pruned_reloaded_checkpoint(family, tmp_path):
    model = tiny(family.model_type)
    kinds = [b.kind for b in blocks(model)]
    removed = list(family.removed) if family.removed is not None else _pick_removed(kinds)
    assert set(kinds) == {kinds[i] for i in removed} or family.removed is not None
    assert max(removed) - min(removed) + 1 > len(removed), "S must be non-contiguous"
    kept = [i for i in range(len(kinds)) if i not in removed]
    ids = _ids()
    with torch.no_grad(), GateManager(model, blocks(model)) as gates:
        full = model(ids).logits
        gates.set(gates.removal_gates(removed))
        gated = model(ids).logits
    assert (gated - full).abs().max() > 1e-3, "removing blocks must change the logits for this test to mean anything"

    remove_blocks(model, removed)
    with torch.no_grad():
        in_memory = model(ids).logits
    assert (in_memory - gated).abs().max() <= 1e-4
    out = save_pruned(model, None, tmp_path / "ck", {"removed": removed})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        pruned = reloaded(ids).logits
    assert (pruned - gated).abs().max() <= 1e-4

    # the saved config describes the remaining blocks: count, kinds, per-layer fields with entries dropped
    saved = json.loads((out / "config.json").read_text())
    spec = ARCHITECTURES[family.model_type]
    for name in spec.count_fields:
        assert getattr(reloaded.config, name) == len(kept)
    for name in spec.layer_fields:
        if name in saved and saved[name] is not None:
            original = getattr(_built(family.model_type).config, name)
            assert list(saved[name]) == [original[i] for i in kept], name
    assert [b.kind for b in blocks(reloaded)] == [kinds[i] for i in kept]
    for new, layer in enumerate(arch.decoder_layers(reloaded)[1]):
        assert all(getattr(m, "layer_idx", None) in (None, new) for m in layer.modules())

    # generate with the cache after reload: same tokens as without the cache
    prompt = _ids(batch=1, seq=5, seed=3)
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False, pad_token_id=0,
                    eos_token_id=None)
    with_cache = reloaded.generate(prompt, use_cache=True, **settings)
    without_cache = reloaded.generate(prompt, use_cache=False, **settings)
    assert with_cache.shape == (1, 11)
    assert torch.equal(with_cache, without_cache)


def test_hessian_runs(family):
    model = tiny(family.model_type)
    ids = _ids(batch=3, seq=10, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a shorter, right-padded sample
    calibration = CalibrationSet(input_ids=ids, attention_mask=mask, source="random")
    A, losses = compute_gate_gradients(model, calibration, batch_size=3, progress=False)
    assert A.shape == (3, family.n_layers)
    assert np.isfinite(A).all() and np.isfinite(losses).all()
    assert (np.abs(A).max(axis=0) > 0).all(), "every block's gate must reach the loss"


# ------------------------------------------------------------------------------------- kinds and --only

def test_removable_blocks_by_kind_and_index():
    kinds = ["mamba", "moe", "attention", "moe", "mamba", "mlp", "mamba", "attention+moe"]
    assert removable_blocks(kinds) is None
    assert removable_blocks(kinds, ["moe"]) == [1, 3, 7]
    assert removable_blocks(kinds, ["moe"], keep=[-1]) == [1, 3]
    assert removable_blocks(kinds, ["mamba", "mlp"]) == [0, 4, 5, 6]
    assert removable_blocks(kinds, keep=[0, 1]) == [2, 3, 4, 5, 6, 7]
    with pytest.raises(CBOPruneError, match="sliding_attention"):
        removable_blocks(kinds, ["sliding_attention"])


def test_nemotron_h_kinds_and_pattern_rewrite():
    model = tiny("nemotron_h")
    kinds = [b.kind for b in blocks(model)]
    assert kinds == ["mamba", "moe", "attention", "moe", "mamba", "mlp", "attention", "moe"]
    assert [b.branches for b in blocks(model)][2] == ("model.layers.2.mixer",)
    assert removable_blocks(kinds, ["moe"]) == [1, 3, 7]
    remove_blocks(model, [1, 3, 7])  # the paper's restriction: MoE layers only
    assert model.config.layers_block_type == ["linear_attention", "full_attention", "linear_attention", "mlp",
                                              "full_attention"]
    assert model.config.num_hidden_layers == 5


def test_sparse_step_moe_becomes_an_explicit_list():
    model = tiny("qwen2_moe")  # decoder_sparse_step=2: MoE on layers 1, 3, 5
    assert [b.kind for b in blocks(model)] == ["attention", "attention+moe"] * 3
    remove_blocks(model, [0, 3])
    assert model.config.decoder_sparse_step == 1
    assert model.config.mlp_only_layers == [1, 2]
    assert block_kinds(model.config) == ["attention+moe", "attention", "attention", "attention+moe"]


def test_jamba_removal_that_breaks_the_period_is_refused_before_touching_the_model():
    model = tiny("jamba")
    with pytest.raises(UnsupportedRemoval, match="expert_layer_period"):
        plan_removal(model, [1])
    with pytest.raises(UnsupportedRemoval):
        remove_blocks(model, [1])
    assert len(arch.decoder_layers(model)[1]) == 8 and model.config.num_hidden_layers == 8


def test_bamba_attention_indices_are_renumbered():
    model = tiny("bamba")
    remove_blocks(model, [0, 4])
    assert model.config.attn_layer_indices == [0]
    assert model.config.num_hidden_layers == 4


# ------------------------------------------------------------------------------------- fallback, errors

def test_unknown_type_uses_generic_discovery_and_logs_once(monkeypatch, caplog, tmp_path):
    monkeypatch.delitem(ARCHITECTURES, "llama")
    arch._log_fallback_once.cache_clear()
    model = tiny("llama")
    with caplog.at_level(logging.WARNING, logger="cboprune.models.architectures"):
        found = blocks(model)
        blocks(model)
    assert [r.message.count("not in the architecture table") for r in caplog.records] == [1]
    assert found[2].branches == ("model.layers.2.self_attn", "model.layers.2.mlp")
    ids = _ids()
    with torch.no_grad(), GateManager(model, blocks(model)) as gates:
        gates.set(gates.removal_gates([1, 4]))
        gated = model(ids).logits
    remove_blocks(model, [1, 4])
    with torch.no_grad():
        assert (model(ids).logits - gated).abs().max() <= 1e-4


def test_model_without_decoder_layers_gets_an_error_naming_it():
    config = AutoConfig.for_model("llama", **dict(BASE, num_hidden_layers=2))

    class Headless(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = config
            self.config.model_type = "mystery_lm"
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(CBOPruneError, match="mystery_lm"):
        blocks(Headless())


def test_adding_a_dense_family_is_a_table_entry(monkeypatch):
    """A family the table does not know, mapped to DENSE by one entry, gets exact gates and surgery."""
    monkeypatch.setitem(ARCHITECTURES, "my_llama_like", arch.DENSE)
    model = tiny("llama")
    model.config.model_type = "my_llama_like"
    assert arch.arch_spec(model) is arch.DENSE
    assert [b.kind for b in blocks(model)] == ["attention"] * 6


def test_archs_lists_every_type_with_kinds(capsys):
    from cboprune.cli import main

    assert main(["archs"]) == 0
    out = capsys.readouterr().out
    for model_type in ARCHITECTURES:
        assert model_type in out
    assert "attention+moe" in out and "mamba" in out


def test_solve_only_moe_restricts_the_solver(tmp_path, capsys):
    """`cboprune solve --only moe` (the paper's Nemotron setting) removes MoE blocks only."""
    from cboprune.cli import main
    from cboprune.selection.hessian import HESSIAN_FORMAT, HessianResult, save_hessian

    kinds = ["mamba", "moe", "attention", "moe", "mamba", "mlp", "attention", "moe"]
    rng = np.random.default_rng(0)
    A = rng.normal(size=(16, 8)).astype(np.float32)
    A[:, [1, 3, 7]] *= 5.0  # MoE blocks look expensive: an unrestricted solver would avoid them
    meta = {"format": HESSIAN_FORMAT, "n_blocks": 8, "block_kinds": kinds,
            "block_names": [f"model.layers.{i}" for i in range(8)]}
    path = save_hessian(HessianResult(A=A, losses=np.zeros(16), meta=meta), tmp_path / "h.safetensors")
    assert main(["solve", "--hessian", str(path), "--remove", "2", "--top", "3", "--only", "moe",
                 "--output-dir", str(tmp_path / "out")]) == 0
    ranking = json.loads((tmp_path / "out" / "rankings" / "M2.json").read_text())
    removed = [set(c["removed"]) for c in ranking["candidates"]]
    assert removed and all(r <= {1, 3, 7} for r in removed)
    assert main(["solve", "--hessian", str(path), "--remove", "2", "--only", "moe", "--keep", "-1"]) == 0
    assert "1, 3" in capsys.readouterr().out
    assert main(["solve", "--hessian", str(path), "--remove", "2", "--only", "sliding_attention"]) == 2
    assert "no block of kind 'sliding_attention'" in capsys.readouterr().err


def test_run_config_only_is_validated_against_the_model_kinds():
    from cboprune.core.config import RunConfig
    from cboprune.engine.session import check_against_model

    cfg = RunConfig.from_sources(None, {"only": "moe", "remove": [2], "keep": [-1]})
    assert cfg.only == ["moe"]
    kinds = ["mamba", "moe", "attention", "moe", "mamba", "mlp", "attention", "moe"]
    assert check_against_model(cfg, 8, kinds) == [7]
    with pytest.raises(CBOPruneError, match="exceeds the 2 removable blocks left after only=moe"):
        check_against_model(RunConfig.from_sources(None, {"only": ["moe"], "remove": [3], "keep": [-1]}), 8, kinds)
    with pytest.raises(CBOPruneError, match="no block of kind 'conv'"):
        check_against_model(RunConfig.from_sources(None, {"only": ["conv"], "remove": [1]}), 8, kinds)


def test_heterogeneous_per_layer_config_is_rekeyed():
    """transformers' sparse `per_layer_config` (keyed by layer index) follows the kept layers."""
    from transformers import LlamaConfig

    from cboprune.models.surgery import _rewrite_config

    config = LlamaConfig(**dict(BASE, num_hidden_layers=4),
                         per_layer_config={0: {"intermediate_size": 40}, 2: {"intermediate_size": 48}})
    _rewrite_config(config, ARCHITECTURES["llama"], [1, 2, 3], 4)
    assert config.num_hidden_layers == 3
    assert [layer.intermediate_size for layer in config.per_layer_config] == [64, 48, 64]


# ------------------------------------------------------------------------------------- checked generic fallback

#: Families outside the table: OPT (fc1/fc2, no `mlp` module), GPT-J (parallel attn + mlp), BLOOM (its
#: attention and MLP modules add the residual themselves, so scaling them would scale the residual).
OUTSIDE = {
    "opt": (dict(hidden_size=32, ffn_dim=64, num_attention_heads=2, word_embed_proj_dim=32,
                 max_position_embeddings=64), "layer"),
    "gptj": (dict(n_embd=32, n_head=2, rotary_dim=8, n_positions=64), "branches"),
    "bloom": (dict(hidden_size=32, n_head=2), "layer"),
}


@cache
def _built_outside(model_type: str) -> torch.nn.Module:
    assert model_type not in ARCHITECTURES
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, num_hidden_layers=5, initializer_range=0.2,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, **OUTSIDE[model_type][0])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("model_type", sorted(OUTSIDE))
def test_fallback_is_exact_at_zero_and_one_and_matches_the_saved_model(model_type, tmp_path):
    model = copy.deepcopy(_built_outside(model_type))
    found = blocks(model)
    assert {b.gating for b in found} == {OUTSIDE[model_type][1]}
    assert model_type in arch.gating_summary(model) and "check" in arch.gating_summary(model)
    if OUTSIDE[model_type][1] == "layer":
        assert arch.describe(model)[0]["branches"] == [arch.WHOLE_LAYER_TEXT]
    ids = _ids()
    removed = [1, 3]
    with torch.no_grad(), GateManager(model, blocks(model)) as gates:
        full = model(ids).logits
        gates.set(torch.ones(gates.n_blocks))
        ones = model(ids).logits
        gates.set(gates.removal_gates(removed, batch=ids.shape[0]))  # per-sample gates too
        gated = model(ids).logits
    assert torch.equal(ones, full), "gates at 1 must reproduce the model bit for bit"
    assert (gated - full).abs().max() > 1e-3
    remove_blocks(model, removed)
    out = save_pruned(model, None, tmp_path / "ck", {"removed": removed})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert (reloaded(ids).logits - gated).abs().max() <= 1e-4, "energies must describe the model prune saves"
    prompt = _ids(batch=1, seq=5, seed=3)
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False, pad_token_id=0,
                    eos_token_id=None)
    assert torch.equal(reloaded.generate(prompt, use_cache=True, **settings),
                       reloaded.generate(prompt, use_cache=False, **settings))


@pytest.mark.parametrize("model_type", sorted(OUTSIDE))
def test_fallback_gate_gradients_flow(model_type):
    """The per-sample gate gradients of the Hessian pass reach every block, also through the whole-layer gate,
    and equal a finite difference of the loss in alpha."""
    from cboprune.selection.hessian import per_sample_loss

    model = copy.deepcopy(_built_outside(model_type))
    ids = _ids(batch=3, seq=10, seed=5)
    calibration = CalibrationSet(input_ids=ids, attention_mask=torch.ones_like(ids), source="random")
    A, _ = compute_gate_gradients(model, calibration, batch_size=3, progress=False)
    assert A.shape == (3, 5) and np.isfinite(A).all() and (np.abs(A).max(axis=0) > 0).all()
    model = model.double()
    eps = 1e-4
    with torch.no_grad(), GateManager(model, blocks(model)) as gates:
        losses = []
        for delta in (eps, -eps):
            g = torch.ones(5, dtype=torch.float64)
            g[2] += delta
            gates.set(g)
            losses.append(per_sample_loss(model(ids).logits, ids, torch.ones_like(ids)))
    numeric = ((losses[0] - losses[1]) / (2 * eps)).numpy()
    assert np.allclose(A[:, 2], numeric, rtol=2e-3, atol=1e-4), (A[:, 2], numeric)


def test_partial_branch_gates_fail_the_check():
    """Gating OPT's attention alone (the old fallback) is caught: gates at 0 are not the identity."""
    from cboprune.models.gating import check_gates

    model = copy.deepcopy(_built_outside("opt"))
    partial = arch._make_blocks(model, arch._spec(branches=("self_attn",)), *arch.decoder_layers(model))
    assert "gates at 0 leave block 0 changing the hidden state" in check_gates(model, partial)
    whole = arch._make_blocks(model, arch.WHOLE_LAYER, *arch.decoder_layers(model))
    assert check_gates(model, whole) is None


def test_fallback_refuses_a_layer_that_cannot_be_gated(monkeypatch):
    """A layer that overwrites its input in place cannot be gated at all: one line, naming the type."""
    model = copy.deepcopy(_built_outside("opt"))
    layer_cls = type(model.model.decoder.layers[0])  # not via cboprune: its verdict is cached per layer list
    original = layer_cls.forward

    def in_place(self, hidden_states, *args, **kwargs):
        out = original(self, hidden_states, *args, **kwargs)
        y = out[0] if isinstance(out, tuple) else out
        hidden_states.mul_(2.0)  # corrupts the residual the whole-layer gate would mix back in
        return out if isinstance(out, tuple) else y

    monkeypatch.setattr(layer_cls, "forward", in_place)
    with pytest.raises(CBOPruneError, match="cannot be gated generically") as err:
        blocks(model)
    assert "\n" not in str(err.value)
