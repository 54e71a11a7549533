"""GGUF in, GGUF out: block removal inside a GGUF (kept tensors byte-identical, depth metadata
rewritten, inexpressible removals refused), HF -> GGUF export, and the real consumer, llama.cpp.

Tests that need llama-cpp-python carry the `llama_cpp` marker (`make test-gguf` installs it and
runs them; there CBOPRUNE_REQUIRE_LLAMA_CPP=1 turns a missing install into a failure, not a skip).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cboprune.core.errors import CBOPruneError
from cboprune.gguf.export import export_gguf
from cboprune.gguf.prune import NAMESPACE, open_gguf, plan_prune, prune_gguf, renamed_tensors, write_gguf
from cboprune.models.loading import default_gguf_path

VOCAB = 512  # the first 512 tokens of the default model's tokenizer (`tiny_tokenizer`), for tiny GGUFs
M8 = [4, 5, 6, 7, 14, 16, 17, 18]  # the default's M = 8 pick (README / docs/study.md)


def _scale_branches(model) -> None:
    # Random init leaves branch outputs tiny next to the residual; scaled up, removing a block
    # (or misplacing a sliding-window layer) changes the logits clearly, so the tests can fail.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(8.0)
            layer.mlp.down_proj.weight.mul_(8.0)


def _tiny(family: str, n_layers: int = 6):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, tie_word_embeddings=False))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True))
    elif family == "qwen3":
        # head_dim stays Qwen3's 128: transformers' GGUF loader does not read attention.key_length
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=128, tie_word_embeddings=True))
    elif family == "gemma3":
        # sliding window 4 < the test prompts' length, so a sliding layer differs from a global one
        # head_dim = query_pre_attn_scalar = 256 as in Gemma-3 1B..12B: llama.cpp scales attention by
        # 1/sqrt(head_dim) and transformers' GGUF loader assumes 256
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=256, query_pre_attn_scalar=256,
                                                          sliding_window=4, tie_word_embeddings=True))
        with torch.no_grad():  # HF norms are 1 + w with w = 0 at init: random w tests the shift
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.3)
    else:
        raise ValueError(family)
    if family == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:  # non-zero q/k/v biases, so a dropped bias shows
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    _scale_branches(model)
    return model.eval()


FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
PROMPT = [1, 420, 312, 44, 500, 17, 300, 25, 441, 290, 11, 137]  # 12 tokens > the sliding window


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A GGUF holding only a tokenizer: the default model's first VOCAB tokens and the merges among
    them. Tiny models need a tokenizer whose size is their vocabulary; a small one keeps every
    GGUF read (ours, transformers', llama.cpp's) from parsing the real one's 98k strings."""
    import gguf

    src = open_gguf(default_gguf_path())
    v = src.values
    tokens = v["tokenizer.ggml.tokens"][:VOCAB]
    known = set(tokens)
    merges = [m for m in v["tokenizer.ggml.merges"][:20000]
              if len(m.split(" ")) == 2 and "".join(m.split(" ")) in known and all(x in known for x in m.split(" "))]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v["tokenizer.ggml.pre"])
    w.add_token_list(tokens)
    w.add_token_types(v["tokenizer.ggml.token_type"][:VOCAB])
    w.add_token_merges(merges)
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        w.add_uint32(f"tokenizer.ggml.{key}", v[f"tokenizer.ggml.{key}"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-tiny")
    out = {}
    for family in FAMILIES:
        model = _tiny(family)
        model.save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def exported(tiny_checkpoints, tiny_tokenizer, tmp_path_factory):
    """family -> {outtype: path} of the tiny checkpoints exported to GGUF."""
    root = tmp_path_factory.mktemp("gguf-exported")
    out = {}
    for family, ckpt in tiny_checkpoints.items():
        out[family] = {t: export_gguf(ckpt, root / f"{family}-{t}.gguf", outtype=t, tokenizer_gguf=tiny_tokenizer)
                       for t in ("f32", "q8_0")}
    return out


def _hf_logits(model, tokens=PROMPT) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def _gguf_in_transformers(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _raw_bytes(model, tensor) -> bytes:
    start = int(tensor.data_offset)
    return bytes(model.reader.data[start:start + int(tensor.n_bytes)])


# ----------------------------------------------------------------------------- prune inside a GGUF

@pytest.mark.real_model
def test_default_gguf_prunes_in_place_of_its_quantization(tmp_path):
    src = default_gguf_path()
    out = prune_gguf(src, M8, tmp_path / "m8.gguf", method="cbo hybrid", energy=1.25)
    a, b = open_gguf(src), open_gguf(out)
    assert (a.n_blocks, b.n_blocks) == (30, 22)
    assert b.values["llama.block_count"] == 22
    # every kept tensor is byte-identical to the source's, under its new name, in the same type
    by_name = {t.name: t for t in b.reader.tensors}
    pairs = renamed_tensors(plan_prune(a, M8))
    assert len(pairs) == len(b.reader.tensors) == 272 - 8 * 9
    for new_name, t in pairs:
        u = by_name[new_name]
        assert u.tensor_type == t.tensor_type and list(u.shape) == list(t.shape)
        assert _raw_bytes(b, u) == _raw_bytes(a, t), new_name
    assert _raw_bytes(b, by_name["blk.4.attn_q.weight"]) == _raw_bytes(a, {t.name: t for t in a.reader.tensors}
                                                                          ["blk.8.attn_q.weight"])
    # smaller by the removed blocks' share (their tensors' bytes), give or take the metadata we add
    removed_bytes = sum(int(t.n_bytes) for t in a.reader.tensors
                        if t.name.startswith(tuple(f"blk.{i}." for i in M8)))
    shrink = src.stat().st_size - out.stat().st_size
    assert abs(shrink - removed_bytes) < 8192, (shrink, removed_bytes)
    # metadata: everything as it was except the depth and our provenance
    changed = {k for k in a.values if a.values[k] != b.values.get(k)}
    assert changed == {"llama.block_count"}
    assert b.values[f"{NAMESPACE}.removed_blocks"] == M8
    assert b.values[f"{NAMESPACE}.source_block_count"] == 30
    assert b.values[f"{NAMESPACE}.method"] == "cbo hybrid" and b.values[f"{NAMESPACE}.energy"] == 1.25
    import hashlib

    assert b.values[f"{NAMESPACE}.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()


@pytest.mark.real_model
def test_pruned_default_gguf_equals_the_pruned_checkpoint_in_transformers(default_model, tmp_path):
    """transformers' own GGUF loader reads the pruned file as exactly the HF model with the same
    blocks removed (both de-quantize the same Q4_1 bits)."""
    import copy

    from cboprune.models.surgery import remove_blocks

    out = prune_gguf(default_gguf_path(), M8, tmp_path / "m8.gguf")
    ours = _gguf_in_transformers(out)
    theirs = remove_blocks(copy.deepcopy(default_model.model), M8).eval()
    tokens = default_model.tokenizer("The capital of France is Paris, and the capital of Italy is")["input_ids"]
    np.testing.assert_allclose(_hf_logits(ours, tokens), _hf_logits(theirs, tokens), atol=1e-4, rtol=0)


def _synthetic_gguf(path: Path, arch: str, n_blocks: int, extra: dict | None = None) -> Path:
    """A minimal GGUF of `arch` (a norm tensor per block, metadata only otherwise): enough for the
    metadata planner, never meant to run."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(n_blocks)
    for key, value in (extra or {}).items():
        if isinstance(value, list):
            w.add_array(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    w.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    for i in range(n_blocks):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.full(8, i, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _nothing_written(directory: Path, name: str) -> bool:
    return not any(p.name == name or p.name.startswith(f".{name}.") for p in directory.iterdir())


def test_gemma3_implied_pattern_is_written_explicitly(tmp_path):
    """Gemma-3 without a pattern key: llama.cpp makes every 6th layer global. After removing block
    1 the global layers must stay the old 5 and 11 (now 4 and 10), so the explicit array is written."""
    src = _synthetic_gguf(tmp_path / "g.gguf", "gemma3", 12, {"attention.sliding_window": 4})
    out = open_gguf(prune_gguf(src, [1], tmp_path / "p.gguf"))
    pattern = out.values["gemma3.attention.sliding_window_pattern"]
    expected = [i % 6 < 5 for i in range(12)]
    assert pattern == [expected[i] for i in range(12) if i != 1]
    assert pattern.index(False) == 4
    # a removal that keeps the implied pattern (a whole period) writes nothing extra
    same = open_gguf(prune_gguf(src, list(range(6)), tmp_path / "q.gguf"))
    assert "gemma3.attention.sliding_window_pattern" not in same.values
    # block tensors renumbered in order, the removed one gone
    norms = [float(np.asarray(out.reader.data[int(t.data_offset):int(t.data_offset) + 4]).view(np.float32)[0])
             for t in out.reader.tensors if t.name.endswith("attn_norm.weight")]
    assert norms == [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    # pruned again: the record stays in the first file's indices (old 0 and 3 are new 0 and 2)
    again = open_gguf(prune_gguf(tmp_path / "p.gguf", [0, 2], tmp_path / "r.gguf"))
    assert again.values["cboprune.removed_blocks"] == [0, 1, 3]
    assert again.values["cboprune.source_block_count"] == 12 and again.values["cboprune.source_file"] == "g.gguf"
    assert again.values["gemma3.attention.sliding_window_pattern"] == [expected[i] for i in range(12)
                                                                      if i not in (0, 1, 3)]


def test_per_layer_arrays_are_sliced(tmp_path):
    src = _synthetic_gguf(tmp_path / "l.gguf", "llama", 4, {"attention.head_count_kv": [1, 2, 3, 4],
                                                              "feed_forward_length": [10, 20, 30, 40]})
    out = open_gguf(prune_gguf(src, [0, 2], tmp_path / "p.gguf"))
    assert out.values["llama.attention.head_count_kv"] == [2, 4]
    assert out.values["llama.feed_forward_length"] == [20, 40]


def test_inexpressible_removal_is_refused_before_anything_is_written(tmp_path):
    """SmolLM3: llama.cpp puts NoPE on every 4th layer by index and reads no key for it."""
    src = _synthetic_gguf(tmp_path / "s.gguf", "smollm3", 8)
    with pytest.raises(CBOPruneError, match="NoPE") as err:
        prune_gguf(src, [0], tmp_path / "p.gguf")
    assert "\n" not in str(err.value)
    assert _nothing_written(tmp_path, "p.gguf")
    assert open_gguf(prune_gguf(src, [0, 1, 2, 3], tmp_path / "ok.gguf")).n_blocks == 4  # a whole period: fine


@pytest.mark.slow
def test_bad_files_are_one_line_and_write_nothing(tmp_path, exported):
    good = exported["llama"]["q8_0"]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good.read_bytes()[:40])
    unknown = _synthetic_gguf(tmp_path / "u.gguf", "rwkv6", 4)
    unknown_array = _synthetic_gguf(tmp_path / "a.gguf", "llama", 4, {"mystery_per_block": [1, 2, 3, 4]})
    cases = [(cut, "truncated"), (junk, "not a GGUF"), (header_only, "corrupt or truncated"),
             (unknown, "architecture 'rwkv6'"), (unknown_array, "mystery_per_block"),
             (tmp_path / "missing.gguf", "not found")]
    for path, words in cases:
        with pytest.raises(CBOPruneError, match=words) as err:
            prune_gguf(path, [1], tmp_path / "out.gguf")
        assert "\n" not in str(err.value), path
        assert _nothing_written(tmp_path, "out.gguf")
    with pytest.raises(CBOPruneError, match="does not exist"):
        prune_gguf(good, [6], tmp_path / "out.gguf")
    with pytest.raises(CBOPruneError, match="all 6 blocks"):
        prune_gguf(good, list(range(6)), tmp_path / "out.gguf")
    assert _nothing_written(tmp_path, "out.gguf")


def test_cli_prune_to_gguf_and_its_errors(tmp_path, exported, capsys):
    from cboprune.cli import main

    src = exported["qwen3"]["q8_0"]
    assert main(["prune", "--model", str(src), "--blocks", "1", "--output", str(src), "--overwrite"]) == 2
    assert "is the source GGUF" in capsys.readouterr().err
    assert main(["prune", "--model", str(src), "--blocks", "1,3", "--output", str(tmp_path / "p.gguf")]) == 0
    assert "removed blocks [1, 3] of 6 (qwen3)" in capsys.readouterr().out
    assert open_gguf(tmp_path / "p.gguf").n_blocks == 4
    for argv, words in (
            (["--blocks", "1", "--output", str(tmp_path / "p.gguf")], "exists"),
            (["--blocks", "9", "--output", str(tmp_path / "q.gguf")], "does not exist"),
            (["--blocks", "1", "--output", str(tmp_path / "q.txt")], "ends with .gguf"),
            (["--output", str(tmp_path / "q.gguf")], "pass one of --blocks")):
        assert main(["prune", "--model", str(src), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cboprune: error:") and words in err and "\n" not in err, err
    assert not (tmp_path / "q.gguf").exists()
    # the blocks of a pruned checkpoint (e.g. `run`'s pick), removed inside the source GGUF
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "removal.json").write_text(json.dumps({"removed": [0, 2], "n_blocks_original": 6, "method": "cbo",
                                                   "energy": 0.5, "state_rank": 1}))
    assert main(["prune", "--model", str(src), "--blocks-from", str(ckpt), "--output", str(tmp_path / "r.gguf")]) == 0
    meta = open_gguf(tmp_path / "r.gguf").values
    assert meta["cboprune.removed_blocks"] == [0, 2] and meta["cboprune.method"] == "cbo"
    assert meta["cboprune.energy"] == 0.5 and meta["cboprune.state_rank"] == 1
    (ckpt / "removal.json").write_text(json.dumps({"removed": [0, 2], "n_blocks_original": 30}))
    assert main(["prune", "--model", str(src), "--blocks-from", str(ckpt), "--output", str(tmp_path / "s.gguf")]) == 2
    assert "30-block model" in capsys.readouterr().err
    assert not (tmp_path / "s.gguf").exists()


# ----------------------------------------------------------------------------- HF -> GGUF

@pytest.mark.parametrize("family", FAMILIES)
def test_export_reads_back_in_transformers(family, tiny_checkpoints, exported):
    """transformers' GGUF loader reads our F32 export as the same model (names, permutations,
    norm shifts and hyper-parameters all undone correctly), and Q8_0 within its rounding."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[family]).eval()
    ref = _hf_logits(hf)
    f32 = _hf_logits(_gguf_in_transformers(exported[family]["f32"]))
    q8 = _hf_logits(_gguf_in_transformers(exported[family]["q8_0"]))
    if family == "gemma3":
        # transformers' GGUF loader ignores gemma3.attention.sliding_window_pattern and rebuilds
        # the default layer types, which our 6-layer tiny model happens to have
        assert hf.config.layer_types == _gguf_in_transformers(exported[family]["f32"]).config.layer_types
    np.testing.assert_allclose(f32, ref, atol=2e-4, rtol=0)
    scale = np.abs(ref).max()
    assert np.abs(q8 - ref).max() < 0.05 * scale
    assert np.abs(q8 - ref).max() > 0  # Q8_0 really is quantized
    m = open_gguf(exported[family]["q8_0"])
    types = {t.tensor_type.name for t in m.reader.tensors}
    assert types == {"F32", "Q8_0"}


def test_export_refuses_an_unknown_family_in_one_line(tmp_path):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    odd = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16)
    Gemma3ForCausalLM(odd).save_pretrained(tmp_path / "gemma")
    with pytest.raises(CBOPruneError, match="query_pre_attn_scalar"):
        export_gguf(tmp_path / "gemma", tmp_path / "g.gguf", tokenizer_gguf=default_gguf_path())
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CBOPruneError, match="'gpt2' family") as err:
        export_gguf(tmp_path / "gpt2", tmp_path / "g.gguf", tokenizer_gguf=default_gguf_path())
    assert "\n" not in str(err.value)
    assert _nothing_written(tmp_path, "g.gguf")
    with pytest.raises(CBOPruneError, match="outtype"):
        export_gguf(tmp_path / "gpt2", tmp_path / "g.gguf", outtype="q4_k")


def test_cli_export(tmp_path, tiny_checkpoints, tiny_tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    from cboprune.cli import main

    out = tmp_path / "q.gguf"
    assert main(["export", str(tiny_checkpoints["qwen2"]), "-o", str(out), "--outtype", "f16",
                 "--tokenizer-gguf", str(tiny_tokenizer)]) == 0
    assert "(f16," in capsys.readouterr().out
    m = open_gguf(out)
    assert m.arch == "qwen2" and {t.tensor_type.name for t in m.reader.tensors} == {"F32", "F16"}
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()  # save_pretrained's progress bar
    for argv, words in (([str(tmp_path / "gpt2"), "-o", str(tmp_path / "g.gguf")], "'gpt2' family"),
                        ([str(tmp_path / "nowhere"), "-o", str(tmp_path / "g.gguf")], "no config.json"),
                        ([str(tiny_checkpoints["qwen2"]), "-o", str(out)], "exists"),
                        ([str(tiny_checkpoints["qwen2"]), "-o", str(tmp_path / "g.bin")], "ends with .gguf")):
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("cboprune: error:") and words in err and "\n" not in err, err
    assert not (tmp_path / "g.gguf").exists()


# ----------------------------------------------------------------------------- llama.cpp, the consumer

@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CBOPRUNE_REQUIRE_LLAMA_CPP"):
            raise
        pytest.skip("llama-cpp-python is not installed (make test-gguf installs it)")
    return llama_cpp


def _llama_logits(path: Path, tokens=PROMPT) -> np.ndarray:
    from cboprune.gguf.runner import open_llama, prompt_logits

    with open_llama(path, n_ctx=64, n_threads=1) as llm:
        return prompt_logits(llm, tokens)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.llama_cpp
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_the_export_and_the_pruned_export(family, llama_cpp, tiny_checkpoints, exported, tmp_path):
    """HF -> GGUF -> llama.cpp: logits match transformers (F32 tightly, Q8_0 within its noise);
    removing blocks inside the GGUF matches the HF model with the same blocks removed."""
    from transformers import AutoModelForCausalLM

    from cboprune.models.surgery import remove_blocks

    hf = AutoModelForCausalLM.from_pretrained(tiny_checkpoints[family]).eval()
    ref = _hf_logits(hf)
    assert _rel(_llama_logits(exported[family]["f32"]), ref) < 2e-3
    assert _rel(_llama_logits(exported[family]["q8_0"]), ref) < 0.05
    # for Gemma-3, removing block 1 moves the global layer 5 to index 4: llama.cpp must read the
    # explicit pattern, or it would make index 5 global
    removed = [1] if family == "gemma3" else [1, 4]
    pruned = prune_gguf(exported[family]["f32"], removed, tmp_path / "p.gguf")
    hf_pruned = remove_blocks(hf, removed).eval()
    pref = _hf_logits(hf_pruned)
    assert _rel(_llama_logits(pruned), pref) < 2e-3
    assert _rel(_llama_logits(pruned), ref) > 0.05  # the removal itself shows
    if family != "gemma3":  # transformers' GGUF loader ignores the Gemma-3 pattern key (see docs/gguf.md)
        np.testing.assert_allclose(_hf_logits(_gguf_in_transformers(pruned)), pref, atol=2e-4, rtol=0)
    if family == "gemma3":
        assert hf_pruned.config.layer_types.index("full_attention") == 4
        # the control: the same file without the explicit pattern runs the wrong layers as global
        source = open_gguf(exported[family]["f32"])
        plan = plan_prune(source, removed)
        plan.metadata["gemma3.attention.sliding_window_pattern"] = None
        wrong = write_gguf(plan, tmp_path / "wrong.gguf")
        assert _rel(_llama_logits(wrong), pref) > 10 * _rel(_llama_logits(pruned), pref)


@pytest.mark.slow
@pytest.mark.llama_cpp
def test_healed_checkpoint_exports_to_q8_0_and_runs_in_llama_cpp(llama_cpp, shared_data, tmp_path):
    from conftest import save_tiny_checkpoint
    from transformers import AutoModelForCausalLM

    from cboprune.heal import HealConfig, heal
    from cboprune.models.surgery import remove_blocks, save_pruned

    teacher = save_tiny_checkpoint(tmp_path / "teacher", n_layers=4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    student = remove_blocks(AutoModelForCausalLM.from_pretrained(teacher), [1, 2])
    save_pruned(student, tok, tmp_path / "student", {"removed": [1, 2], "source_model": "default"})
    heal(HealConfig(student=str(tmp_path / "student"), teacher=str(teacher),
                    data=str(shared_data / "calib" / "alpaca_en_demo.json"), output_dir=str(tmp_path / "healed"),
                    seq_len=32, micro_batch_size=2, global_batch_size=2, max_steps=2, max_samples=8,
                    heldout_samples=4, warmup_ratio=0.0), progress=False)
    healed = tmp_path / "healed"
    out = export_gguf(healed, tmp_path / "healed.Q8_0.gguf", outtype="q8_0")  # tokenizer: removal.json's source
    meta = open_gguf(out).values
    assert meta["cboprune.removed_blocks"] == [1, 2] and meta["cboprune.healed"] is True
    ref = _hf_logits(AutoModelForCausalLM.from_pretrained(healed).eval())
    before = _hf_logits(student.eval())
    assert np.abs(ref - before).max() > 0  # the heal changed the weights that were exported
    assert _rel(_llama_logits(out), ref) < 0.05


@pytest.mark.llama_cpp
@pytest.mark.real_model
def test_pruned_default_gguf_runs_in_llama_cpp(llama_cpp, tmp_path):
    """The default model, Q4_1 as shipped, pruned inside the GGUF: llama.cpp loads it, its logits
    follow transformers' reading of the same file within Q4_1 / Q8_1 compute noise, and it
    generates text."""
    from cboprune.gguf.runner import greedy_text, open_llama, prompt_logits

    out = prune_gguf(default_gguf_path(), M8, tmp_path / "m8.gguf")
    ours = _gguf_in_transformers(out)
    with open_llama(out, n_ctx=256, n_threads=2) as llm:
        tokens = llm.tokenize(b"The capital of France is Paris, and the capital of Italy is", add_bos=False)
        lc = prompt_logits(llm, tokens)
        text = greedy_text(llm, "What is the capital of France?", 24)
    hf = _hf_logits(ours, tokens)
    top_agree = float(np.mean(lc.argmax(-1) == hf.argmax(-1)))
    corr = float(np.corrcoef(lc.ravel(), hf.ravel())[0, 1])
    print(f"pruned default in llama.cpp: top-1 agreement {top_agree:.2f}, correlation {corr:.4f}, text {text!r}")
    assert corr > 0.98 and top_agree >= 0.75
    words = text.split()
    assert len(words) >= 5 and sum(w.isascii() for w in words) >= 0.8 * len(words)


@pytest.mark.llama_cpp
def test_bench_engine_llama_cpp(llama_cpp, exported, tmp_path, capsys):
    from cboprune.cli import main

    src = exported["llama"]["q8_0"]
    pruned = prune_gguf(src, [0, 1, 2], tmp_path / "p.gguf")
    assert main(["bench", "--engine", "llama.cpp", str(src), str(pruned), "--lengths", "16", "--new-tokens", "4",
                 "--repeats", "2", "--warmup", "0", "--threads", "1", "-o", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert [m["blocks"] for m in report["models"].values()] == [6, 3]
    rows = report["runs"]
    assert len(rows) == 2 and rows[1]["prompt_speedup"]["n"] == 2
    assert all(r["prompt_tokens_per_s"]["median"] > 0 and r["generation_tokens_per_s"]["median"] > 0 for r in rows)
    assert "generation tok/s" in capsys.readouterr().out
    assert main(["bench", "--engine", "llama.cpp", str(src), str(tmp_path)]) == 2
    assert "not GGUF" in capsys.readouterr().err


@pytest.mark.slow
def test_export_without_a_source_gguf_reads_tokenizer_json(tmp_path):
    """No GGUF to copy the tokenizer from: gguf.vocab reads tokenizer.json (ids, merges, specials)."""
    from conftest import save_tiny_checkpoint
    from transformers import AutoTokenizer

    ckpt = save_tiny_checkpoint(tmp_path / "tiny", n_layers=2)
    out = open_gguf(export_gguf(ckpt, tmp_path / "t.gguf", outtype="f16"))
    tok = AutoTokenizer.from_pretrained(ckpt)
    tokens = out.values["tokenizer.ggml.tokens"]
    assert len(tokens) == 49152 and out.values["tokenizer.ggml.pre"] == "default"
    assert [tokens[i] for i in (0, 1, 2, 500, 49151)] == tok.convert_ids_to_tokens([0, 1, 2, 500, 49151])
    assert len(out.values["tokenizer.ggml.merges"]) > 40000
    assert out.values["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
