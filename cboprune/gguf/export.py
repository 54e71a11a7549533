"""Export a Hugging Face checkpoint (pruned, healed or not) to GGUF: F32, F16, BF16 or Q8_0.

    export_gguf("outputs/m8-healed", "m8.Q8_0.gguf", outtype="q8_0")

Tensor names come from the `gguf` package's `TensorNameMap`, values are quantized by `gguf.quants`,
the file is written by `GGUFWriter`. llama.cpp's own converter (`convert_hf_to_gguf.py`) is a
script, not an installable library, so the few things it does beyond naming and quantizing are
done here, each as it does them and no more (docs/gguf.md): the hyper-parameter keys, the q/k
row permutation of Llama-style checkpoints (llama.cpp's RoPE pairs adjacent dimensions, the HF
code rotates halves), Gemma's RMSNorm weights stored as 1 + w, and F32 for 1-D tensors.

The tokenizer is copied from a GGUF (the source model when the checkpoint's `removal.json` names
one that is a GGUF, e.g. `default`; or `tokenizer_gguf=`): the exact tokens, merges, pre-tokenizer
and chat template llama.cpp already uses. Otherwise a byte-level BPE vocabulary is read from
`tokenizer.json` by `gguf.vocab` (llama.cpp's `default` pre-tokenizer; a warning says so).
A family whose layout is not in `FAMILIES` is refused in one line naming it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cboprune.core.errors import CBOPruneError
from cboprune.gguf import OUTTYPES
from cboprune.gguf.prune import read_gguf
from cboprune.models.loading import DEFAULT_MODEL, check_checkpoint_dir, default_gguf_path
from cboprune.core.outputs import check_output_file, staged_file
from cboprune.core.version import __version__

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Family:
    """How one HF model_type becomes a GGUF architecture."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # Llama-style: q/k rows reordered for llama.cpp's RoPE
    norm_shift: float = 0.0  # Gemma: llama.cpp multiplies by the stored weight, HF by (1 + weight)
    sliding_window: bool = False  # write the window and the explicit per-layer pattern


FAMILIES: dict[str, Family] = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "gemma3_text": Family("GEMMA3", norm_shift=1.0, sliding_window=True),
}


def _file_type(outtype: str) -> int:
    from gguf import LlamaFileType

    return {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
            "q8_0": LlamaFileType.MOSTLY_Q8_0}[outtype]


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.LlamaModel.permute: [n_head * 2 * half, ...] halves -> pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(params: dict | None, config: Any, default: float = 10000.0) -> float:
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", default) or default)


def _check_rope(params: dict | None, model_type: str) -> dict | None:
    """Rope scaling the exporter writes: none or linear; anything else refused in one line."""
    if not isinstance(params, dict):
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(params["factor"])}
    raise CBOPruneError(f"{model_type} checkpoint uses rope scaling {kind!r}, which the GGUF export does not write "
                        "yet: export from a model without it, or use llama.cpp's convert_hf_to_gguf.py")


def _hparams(writer: Any, config: Any, family: Family, n_blocks: int) -> None:
    """The `<arch>.*` keys llama.cpp needs, as its converter writes them for this family."""
    from gguf import RopeScalingType

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(n_blocks)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    rope = getattr(config, "rope_parameters", None)
    if family.sliding_window:  # Gemma-3: per-attention-type rope parameters
        rope = rope or {}
        full, local = rope.get("full_attention", rope), rope.get("sliding_attention", {})
        writer.add_rope_freq_base(_rope_theta(full, config, 1e6))
        if local:
            writer.add_rope_freq_base_swa(_rope_theta(local, config))
        scaling = _check_rope(full, config.model_type)
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window and layer_types:
            writer.add_sliding_window(int(window))
            # Explicit, so a pruned model's pattern (no longer every 6th) is read as it is.
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            writer.add_final_logit_softcapping(float(cap))
    else:
        writer.add_rope_freq_base(_rope_theta(rope, config))
        writer.add_rope_dimension_count(head_dim)
        scaling = _check_rope(rope, config.model_type)
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) \
                and config.model_type == "mistral":
            writer.add_sliding_window(int(config.sliding_window))
    if scaling:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])


def _check_expressible(config: Any, family: Family) -> None:
    """Settings llama.cpp hard-codes for the family, refused when the checkpoint differs."""
    if family.arch == "GEMMA3":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        scalar = getattr(config, "query_pre_attn_scalar", head_dim)
        # gemma3.cpp: 1/sqrt(head_dim), except its 27B (62 layers): 1/sqrt(hidden / heads); no key
        expected = config.hidden_size / config.num_attention_heads if config.num_hidden_layers == 62 else head_dim
        if scalar != expected:
            raise CBOPruneError(f"this gemma3 checkpoint scales attention by query_pre_attn_scalar={scalar}, but "
                                f"llama.cpp uses {expected:g} for a {config.num_hidden_layers}-layer gemma3 and reads "
                                "no key for it: the GGUF would compute another model")


# ----------------------------------------------------------------------------- tokenizer

def _source_gguf(checkpoint: Path) -> Path | None:
    """The GGUF the checkpoint came from, per its removal.json (`default` or a .gguf path), if any."""
    removal = checkpoint / "removal.json"
    if not removal.is_file():
        return None
    try:
        source = json.loads(removal.read_text(encoding="utf-8")).get("source_model")
    except (OSError, ValueError, AttributeError):
        return None
    if source == DEFAULT_MODEL:
        return default_gguf_path()
    if isinstance(source, str) and source.endswith(".gguf") and Path(source).expanduser().is_file():
        return Path(source).expanduser()
    return None


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(path: Path, size: int, mtime: float) -> tuple[tuple[str, Any, Any, Any], ...]:
    """(key, value, value type, array sub type) of every tokenizer.* key of a GGUF, read once per
    process (parsing ~100k token strings takes seconds)."""
    from gguf import GGUFValueType as T

    _, reader, values = read_gguf(path)  # a model or a vocabulary-only GGUF
    return tuple((key, values[key], field.types[0], field.types[-1] if field.types[0] == T.ARRAY else None)
                 for key, field in reader.fields.items() if key.startswith("tokenizer."))


def _copy_tokenizer(writer: Any, tokenizer_gguf: Path, n_vocab: int) -> None:
    st = tokenizer_gguf.stat()
    fields = _tokenizer_fields(tokenizer_gguf.resolve(), st.st_size, st.st_mtime)
    tokens = next((value for key, value, _, _ in fields if key == "tokenizer.ggml.tokens"), None)
    if not isinstance(tokens, list):
        raise CBOPruneError(f"{tokenizer_gguf} holds no tokenizer (tokenizer.ggml.tokens): pass another --tokenizer-gguf")
    if len(tokens) != n_vocab:
        raise CBOPruneError(f"the tokenizer of {tokenizer_gguf} has {len(tokens)} tokens but the checkpoint's "
                            f"embedding has {n_vocab} rows: pass the GGUF this checkpoint came from")
    for key, value, vtype, sub in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)


def _bpe_tokenizer(writer: Any, checkpoint: Path, n_vocab: int) -> None:
    """A byte-level BPE vocabulary read by gguf.vocab from tokenizer.json (llama.cpp pre-tokenizer
    `default`: the regex llama.cpp uses when it does not recognise the tokenizer)."""
    import gguf
    from gguf.vocab import BpeVocab, SpecialVocab

    try:
        vocab = BpeVocab(checkpoint)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as exc:
        raise CBOPruneError(f"{checkpoint} has no byte-level BPE tokenizer the GGUF export can read ({exc}): pass "
                            "--tokenizer-gguf with a GGUF holding this model's tokenizer") from None
    tokens, types = [], []
    for text, _score, ttype in vocab.all_tokens():
        tokens.append(text)
        types.append(int(ttype))
    if len(tokens) > n_vocab:
        raise CBOPruneError(f"the tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):  # padded embedding rows, as llama.cpp's converter pads them
        tokens.append(f"[PAD{i}]".encode())
        types.append(int(gguf.TokenType.UNUSED))
    log.warning("tokenizer from %s/tokenizer.json with llama.cpp's default pre-tokenizer: its splits may differ "
                "from the HF tokenizer's; pass --tokenizer-gguf for an exact copy", checkpoint)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(checkpoint, load_merges=True, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)


# ----------------------------------------------------------------------------- tensors

def _quantize(name: str, data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """(stored array, GGML type): 1-D tensors stay F32 (as llama.cpp's converter keeps them);
    Q8_0 falls back to F16 for rows not a multiple of its 32-value block."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if data.ndim <= 1 or outtype == "f32":
        return data.astype(np.float32), Q.F32
    if outtype == "f16":
        return data.astype(np.float16), Q.F16
    kind = Q.BF16 if outtype == "bf16" else Q.Q8_0
    try:
        return quants.quantize(data.astype(np.float32), kind), kind
    except quants.QuantError:
        log.info("%s: row length %d is not a multiple of %s's block, stored as F16", name, data.shape[-1], kind.name)
        return data.astype(np.float16), Q.F16


def _tensors(checkpoint: Path) -> Callable[[], Any]:
    """(name, float32 numpy array) of every tensor of the checkpoint's safetensors files, lazily."""
    from safetensors import safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise CBOPruneError(f"{checkpoint} holds no .safetensors weights: re-save it with save_pretrained")

    def items():
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key).float().numpy()
    return items


def export_gguf(checkpoint: str | Path, out: str | Path, *, outtype: str = "q8_0",
                tokenizer_gguf: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the HF checkpoint directory `checkpoint` as one GGUF file `out` (atomically)."""
    import gguf

    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise CBOPruneError(f"--outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    checkpoint = Path(checkpoint).expanduser()
    if not (checkpoint / "config.json").is_file():
        raise CBOPruneError(f"{checkpoint} is not a Hugging Face checkpoint directory (no config.json)")
    out_path = check_output_file(out, overwrite)
    check_checkpoint_dir(checkpoint)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise CBOPruneError(f"the GGUF export does not know the tensor layout of the {config.model_type!r} family; "
                            f"it exports {', '.join(sorted(FAMILIES))}")
    _check_expressible(config, family)
    tok_source = Path(tokenizer_gguf).expanduser() if tokenizer_gguf else _source_gguf(checkpoint)
    if tok_source is not None and not tok_source.is_file():
        raise CBOPruneError(f"tokenizer GGUF not found: {tok_source}")
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    n_blocks = config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch, n_blocks)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads

    # every tensor mapped and checked before the output is staged
    items = _tensors(checkpoint)
    plan = []
    for hf_name, _ in _shapes(checkpoint):
        if hf_name.endswith(("rotary_emb.inv_freq",)):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:  # the map holds only tensors this architecture has
            raise CBOPruneError(f"{checkpoint}: tensor {hf_name} has no GGUF name for {arch_name}; this "
                                f"{config.model_type} checkpoint has a layout the export does not know")
        plan.append((hf_name, name))
    n_vocab = config.vocab_size

    with staged_file(out_path, overwrite=overwrite) as stage:
        writer = gguf.GGUFWriter(stage, arch_name, use_temp_file=True)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(checkpoint.name)
        writer.add_file_type(_file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(writer, config, family, n_blocks)
        if tok_source is not None:
            _copy_tokenizer(writer, tok_source, n_vocab)
        else:
            _bpe_tokenizer(writer, checkpoint, n_vocab)
        writer.add_string("cboprune.version", __version__)
        writer.add_string("cboprune.exported_from", checkpoint.name)
        _add_removal(writer, checkpoint)
        mapped = dict(plan)
        for hf_name, data in items():
            if hf_name not in mapped:
                continue
            name = mapped[hf_name]
            if family.permute_qk and name.endswith("attn_q.weight"):
                data = _permute(data, heads)
            elif family.permute_qk and name.endswith("attn_k.weight"):
                data = _permute(data, kv_heads)
            if family.norm_shift and name.endswith("norm.weight"):
                data = data + family.norm_shift
            stored, qtype = _quantize(name, data, outtype)
            writer.add_tensor(name, stored, raw_dtype=qtype)  # a quantized uint8 array: shape from its bytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    log.info("exported %s -> %s (%s)", checkpoint, out_path, outtype)
    return out_path


def _shapes(checkpoint: Path) -> list[tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    out = []
    for f in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out += [(k, tuple(st.get_slice(k).get_shape())) for k in st.keys()]
    return out


def _add_removal(writer: Any, checkpoint: Path) -> None:
    """The checkpoint's removal.json as cboprune.* keys (removed blocks, method, energy, source)."""
    from gguf import GGUFValueType as T

    path = checkpoint / "removal.json"
    if not path.is_file():
        return
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(info, dict):
        return
    removed = info.get("removed")
    if isinstance(removed, list) and removed and all(isinstance(i, int) for i in removed):
        writer.add_key_value("cboprune.removed_blocks", removed, T.ARRAY, sub_type=T.UINT32)
    if isinstance(info.get("n_blocks_original"), int):
        writer.add_uint32("cboprune.source_block_count", info["n_blocks_original"])
    for key, field in (("method", "method"), ("source_model", "source_model"), ("energy_model", "energy_model")):
        if isinstance(info.get(key), str) and info[key]:
            writer.add_string(f"cboprune.{field}", info[key])
    energy = info.get("energy", info.get("score"))
    if isinstance(energy, (int, float)) and math.isfinite(energy):
        writer.add_float64("cboprune.energy", float(energy))
    if (checkpoint / "healing.json").is_file():
        writer.add_bool("cboprune.healed", True)


__all__ = ["FAMILIES", "OUTTYPES", "export_gguf"]
