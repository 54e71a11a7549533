"""The one place that knows model architectures: a declarative table keyed by `config.model_type`.

Each `ArchSpec` entry says

- where the decoder-layer `ModuleList` is (`layers`),
- which submodules of a block write into the residual stream (`branches`, the modules whose
  outputs the CBO gates scale; a block gates those of them it actually has),
- what kind each block is (`kinds`: read per block from config fields, see `Kinds`),
- which config fields describe the layers and must be rewritten when blocks are removed
  (`count_fields`, per-layer lists/pattern strings in `layer_fields`, lists of layer indices in
  `index_fields`, and named `relayouts` for layouts that a config expresses by a formula such as
  Qwen-MoE's `decoder_sparse_step` or Jamba's attention period).

Unknown model types go through a generic discovery of the decoder-layer `ModuleList`, and their
gates are checked on the real model (`gating.check_gates`: all gates at 0 give the identity, all at
1 reproduce the logits): the branches the layer's child names suggest if they pass, else each
layer's whole residual update h + alpha * (layer(h) - h), exact at 0 and 1 for any layer; a layer
that passes neither is refused. Which one was used is logged once and shown by `archs --model`.
Nothing else in cboprune looks at model names. Adding a family whose blocks look like Llama's is
one line: `"my_type": DENSE`; see docs/architectures.md.

Block kinds are strings made of parts joined by "+": the mixer (`attention`, `sliding_attention`,
`linear_attention`, `mamba`, `conv`; absent for layers that are only an FFN) followed by `moe`
when the block's FFN is a mixture of experts; a layer that is only a dense FFN is `mlp`, one that
is only an MoE is `moe`. Examples: Llama `attention`, Mixtral `attention+moe`, Gemma 2
`sliding_attention`, Jamba `mamba+moe`, Falcon-H1 `attention+mamba`, Nemotron-H `mamba`, `moe`,
`attention`, `mlp`. `--only moe` selects every block with an `moe` part.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import Any

from torch import nn

from cboprune.core.errors import CBOPruneError
from cboprune.models.gating import check_gates

log = logging.getLogger(__name__)

#: Every block kind part cboprune uses, with what it means (shown by `cboprune archs`).
KIND_PARTS: dict[str, str] = {
    "attention": "full causal self-attention",
    "sliding_attention": "sliding-window (local) self-attention",
    "chunked_attention": "chunked (local) self-attention",
    "linear_attention": "linear attention / gated delta-net mixer",
    "mamba": "Mamba / Mamba-2 state-space mixer",
    "conv": "short causal convolution mixer (LFM2)",
    "moe": "mixture-of-experts FFN (or an MoE-only layer)",
    "mlp": "a layer that is only a dense FFN",
}

#: Common values of `layer_types` (transformers' convention) and their kinds. "" = no mixer.
LAYER_TYPE_KINDS: Mapping[str, str] = MappingProxyType({
    "full_attention": "attention",
    "attention": "attention",
    "sliding_attention": "sliding_attention",
    "chunked_attention": "chunked_attention",
    "linear_attention": "linear_attention",
    "conv": "conv",
    "mamba": "mamba",
    "moe": "moe",
    "mlp": "mlp",
    "hybrid": "attention+mamba",
})
#: Hybrid Mamba families call their Mamba layers "linear_attention" (transformers >= 5) or "mamba".
MAMBA_LAYER_TYPE_KINDS: Mapping[str, str] = MappingProxyType({**LAYER_TYPE_KINDS, "linear_attention": "mamba"})


# --- which blocks have a mixture-of-experts FFN: the few layouts configs express by a formula ---------
def _moe_all(config: Any, i: int) -> bool:
    return True


def _moe_sparse_step(config: Any, i: int) -> bool:
    """Qwen2/3-MoE, Qwen3-Next: MoE unless listed in `mlp_only_layers`, on every `decoder_sparse_step`-th layer."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (i not in (getattr(config, "mlp_only_layers", None) or [])
            and (getattr(config, "num_experts", 0) or 0) > 0 and (i + 1) % step == 0)


def _moe_expert_period(config: Any, i: int) -> bool:
    """Jamba: `layers_num_experts[i] > 1` (from `expert_layer_period` / `expert_layer_offset`)."""
    return config.layers_num_experts[i] > 1


def _moe_first_k_dense(config: Any, i: int) -> bool:
    """DeepSeek-V3 style: the first `first_k_dense_replace` layers are dense, the rest MoE."""
    return i >= (getattr(config, "first_k_dense_replace", 0) or 0)


def _moe_if_experts(config: Any, i: int) -> bool:
    """GraniteMoeHybrid: every layer has an MoE when `num_local_experts > 0`."""
    return (getattr(config, "num_local_experts", 0) or 0) > 0


MOE_LAYOUTS: dict[str, Callable[[Any, int], bool]] = {
    "all": _moe_all,
    "sparse_step": _moe_sparse_step,
    "expert_period": _moe_expert_period,
    "first_k_dense": _moe_first_k_dense,
    "if_experts": _moe_if_experts,
}


@dataclass(frozen=True)
class Kinds:
    """How to read each block's kind from the config.

    mixer: the mixer kind of every block when `field` is None or missing from the config.
    field: a per-layer config field (list, or pattern string with one character per layer) naming
        each block's mixer; its values are translated by `values` (unknown values are used as is).
    values: field value -> kind ("" for a layer without mixer; may already contain "+moe").
    moe: name of the MoE layout in MOE_LAYOUTS telling which blocks have an MoE FFN (None: none).
    """

    mixer: str = "attention"
    field: str | None = "layer_types"
    values: Mapping[str, str] = dataclasses.field(default_factory=lambda: LAYER_TYPE_KINDS)
    moe: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    """How to find, gate and remove the blocks of one model family.

    layers: dotted path from the *ForCausalLM module to the decoder-layer ModuleList.
    branches: submodule names inside one block whose outputs are added to the residual stream.
        When a family normalizes a branch output before the residual add (Gemma 2/3, OLMo-2,
        EXAONE-4, GLM-4 post-norms), the branch to gate is that norm: Norm(alpha * y) would undo
        alpha. Each block gates the branches it has (hybrids have `mamba` or `self_attn`).
    kinds: how each block's kind is read from the config.
    block_kinds: the kinds this family can have (documentation; shown by `cboprune archs`).
    count_fields: config fields holding the number of blocks (all are set to the new count).
    layer_fields: per-layer config fields (lists, or pattern strings with one character per
        block); the entries of removed blocks are dropped.
    index_fields: config fields listing layer indices (`attn_layer_indices`, `mlp_only_layers`);
        removed indices are dropped and the rest renumbered.
    relayouts: names of rewrites in `cboprune.models.surgery.RELAYOUTS` for layer layouts a config
        expresses by a formula (`sparse_step`, `periods`, `first_k_dense`).
    gating: "branches" (scale each branch output: the paper's gates) or "layer" (gate the block's
        whole residual update, h + alpha * (layer(h) - h): exact at 0 and 1 for any layer; the
        generic fallback uses it when gating the named branches fails the check on the real model).
    repair_fold: path inside a block of the FFN output projection (a Linear or Conv1D whose output
        is added linearly to the residual stream) that a linear repair folds its map into
        (cboprune.repair); None: folding is not exact for this family, `repair_refusal` says why.
    repair_scale: config field scaling that projection's output before the residual add
        (Granite's `residual_multiplier`); None: added as is.
    repair_embeddings: module paths from the *ForCausalLM whose outputs sum to the first block's
        input (a run starting at block 0 folds into all of them); () = get_input_embeddings() alone.
    repair_refusal: why a linear map cannot be folded exactly (when `repair_fold` is None).
    """

    layers: str = "model.layers"
    branches: tuple[str, ...] = ("self_attn", "mlp")
    kinds: Kinds = Kinds()
    block_kinds: tuple[str, ...] = ("attention",)
    count_fields: tuple[str, ...] = ("num_hidden_layers",)
    layer_fields: tuple[str, ...] = ("layer_types",)
    index_fields: tuple[str, ...] = ()
    relayouts: tuple[str, ...] = ()
    gating: str = "branches"
    repair_fold: str | None = None
    repair_scale: str | None = None
    repair_embeddings: tuple[str, ...] = ()
    repair_refusal: str = "no FFN output projection to fold a linear map into is known for this family"


#: Why a linear repair refuses post-norm and MoE families (see docs/repair.md).
_POST_NORM_REFUSAL = ("the FFN output is normalized (post-norm) before the residual add, so a linear map after "
                      "the block cannot be folded into the weights exactly")
_MOE_REFUSAL = ("the FFN is a mixture of experts without one shared output projection; folding into every "
                "expert's output projection would be exact but is not implemented")


def _spec(**changes: Any) -> ArchSpec:
    return ArchSpec(**changes)


#: Llama-like: model.layers[i].{self_attn, mlp}, pre-norms, optional `layer_types` (sliding windows).
DENSE = ArchSpec(block_kinds=("attention", "sliding_attention"), repair_fold="mlp.down_proj")
#: Post-norm families: the branch output is normalized before the residual add, so gate the norm.
POST_NORM = _spec(branches=("post_attention_layernorm", "post_feedforward_layernorm"),
                  block_kinds=("attention", "sliding_attention"), repair_refusal=_POST_NORM_REFUSAL)
#: Dense attention + a mixture-of-experts FFN at `mlp` in every block.
MOE = _spec(kinds=Kinds(moe="all"), block_kinds=("attention+moe", "sliding_attention+moe"),
            repair_refusal=_MOE_REFUSAL)
#: Qwen-MoE style: MoE on every `decoder_sparse_step`-th layer except `mlp_only_layers`.
SPARSE_STEP_MOE = _spec(kinds=Kinds(moe="sparse_step"), block_kinds=("attention", "attention+moe"),
                        index_fields=("mlp_only_layers",), relayouts=("sparse_step",),
                        repair_refusal=_MOE_REFUSAL)
#: Pure state-space models: backbone.layers[i].mixer, `layer_types` derived from the count.
MAMBA_ONLY = _spec(layers="backbone.layers", branches=("mixer",), kinds=Kinds(field=None, mixer="mamba"),
                   block_kinds=("mamba",), layer_fields=())

ARCHITECTURES: dict[str, ArchSpec] = {
    # dense, Llama-like (one line per family)
    "llama": DENSE, "mistral": DENSE, "qwen2": DENSE, "qwen3": DENSE, "gemma": DENSE,
    "phi3": DENSE, "olmo": DENSE, "stablelm": DENSE, "glm": DENSE, "helium": DENSE,
    "seed_oss": DENSE, "arcee": DENSE, "internlm3": DENSE, "ernie4_5": DENSE, "hunyuan_v1_dense": DENSE,
    "apertus": DENSE, "nemotron": DENSE,
    # parallel attention + FFN on one normalized input: both branches add to the same residual
    "phi": dataclasses.replace(DENSE, repair_fold="mlp.fc2"), "cohere": DENSE, "cohere2": DENSE,
    # dense with another FFN output projection name, or a scaled residual add
    "starcoder2": dataclasses.replace(DENSE, repair_fold="mlp.c_proj"),
    "granite": dataclasses.replace(DENSE, repair_scale="residual_multiplier"),
    "smollm3": _spec(layer_fields=("layer_types", "no_rope_layers"), block_kinds=("attention",),
                     repair_fold="mlp.down_proj"),
    # post-norm families
    "gemma2": POST_NORM, "gemma3_text": POST_NORM, "olmo2": POST_NORM, "olmo3": POST_NORM, "exaone4": POST_NORM,
    "glm4": _spec(branches=("post_self_attn_layernorm", "post_mlp_layernorm"), block_kinds=("attention",),
                  repair_refusal=_POST_NORM_REFUSAL),
    # other module layouts
    "gpt2": _spec(layers="transformer.h", branches=("attn", "mlp"), count_fields=("n_layer",),
                  repair_fold="mlp.c_proj", repair_embeddings=("transformer.wte", "transformer.wpe")),
    "gpt_neox": _spec(layers="gpt_neox.layers", branches=("attention", "mlp"), repair_fold="mlp.dense_4h_to_h"),
    # mixtures of experts
    "mixtral": MOE, "olmoe": MOE, "phimoe": MOE, "gpt_oss": MOE,
    "granitemoe": _spec(branches=("self_attn", "block_sparse_moe"), kinds=Kinds(moe="all"),
                        block_kinds=("attention+moe",), repair_refusal=_MOE_REFUSAL),
    "qwen2_moe": SPARSE_STEP_MOE, "qwen3_moe": SPARSE_STEP_MOE,
    "deepseek_v3": _spec(kinds=Kinds(moe="first_k_dense"), block_kinds=("attention", "attention+moe"),
                         relayouts=("first_k_dense",), repair_refusal=_MOE_REFUSAL),
    # hybrids
    "jamba": _spec(branches=("self_attn", "mamba", "feed_forward"),
                   kinds=Kinds(field="layers_block_type", values=MAMBA_LAYER_TYPE_KINDS, moe="expert_period"),
                   block_kinds=("attention", "attention+moe", "mamba", "mamba+moe"), layer_fields=(),
                   relayouts=("periods",)),
    "bamba": _spec(branches=("self_attn", "mamba", "feed_forward"),
                   kinds=Kinds(field="layers_block_type", values=MAMBA_LAYER_TYPE_KINDS),
                   block_kinds=("attention", "mamba"), layer_fields=(), index_fields=("attn_layer_indices",)),
    "falcon_h1": _spec(branches=("mamba", "self_attn", "feed_forward"), kinds=Kinds(field=None, mixer="attention+mamba"),
                       block_kinds=("attention+mamba",), layer_fields=()),
    "nemotron_h": _spec(branches=("mixer",), kinds=Kinds(field="layers_block_type", values=MAMBA_LAYER_TYPE_KINDS),
                        block_kinds=("mamba", "attention", "moe", "mlp"), layer_fields=("layers_block_type",)),
    "granitemoehybrid": _spec(branches=("self_attn", "mamba", "block_sparse_moe", "shared_mlp"),
                              kinds=Kinds(values=MAMBA_LAYER_TYPE_KINDS, moe="if_experts"),
                              block_kinds=("attention", "attention+moe", "mamba", "mamba+moe")),
    "qwen3_next": _spec(branches=("self_attn", "linear_attn", "mlp"), kinds=Kinds(moe="sparse_step"),
                        block_kinds=("attention", "attention+moe", "linear_attention", "linear_attention+moe"),
                        index_fields=("mlp_only_layers",), relayouts=("sparse_step",)),
    "mamba": MAMBA_ONLY, "mamba2": MAMBA_ONLY, "falcon_mamba": MAMBA_ONLY,
    "lfm2": _spec(branches=("self_attn", "conv", "feed_forward"), block_kinds=("attention", "conv"),
                  index_fields=("full_attn_idxs",)),
}

#: Decoder-only families that are known not to work, with the reason (raised as an error).
UNSUPPORTED: dict[str, str] = {}

#: Encoder-only families that transformers can also build as a causal LM (with `is_decoder`): they are
#: bidirectional encoders, so a block-removal study of them as causal LMs would be meaningless.
ENCODER_ONLY: frozenset[str] = frozenset({
    "bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "electra", "ernie", "bert-generation",
    "data2vec-text", "megatron-bert", "rembert", "roformer", "xmod", "big_bird", "roc_bert", "qdqbert", "nezha",
    "modernbert", "distilbert", "albert", "deberta", "deberta-v2", "mpnet", "funnel", "layoutlm", "squeezebert",
})
#: `config.architectures` suffixes of heads that continue a text left to right.
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_decoder_only(config: Any, name: str = "") -> None:
    """Refuse, from the config alone, a model that is not a decoder-only causal LM (T5, BART, BERT ...)."""
    what = f"model {name!r}" if name else "the model"
    model_type = getattr(config, "model_type", "?")
    architectures = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        reason = "it is an encoder-decoder model"
    elif model_type in ENCODER_ONLY:
        reason = "it is an encoder-only model"
    elif architectures and not any(a.endswith(_CAUSAL_HEADS) for a in architectures):
        reason = f"its checkpoint is a {', '.join(architectures)}"
    else:
        from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

        if type(config) in MODEL_FOR_CAUSAL_LM_MAPPING or "AutoModelForCausalLM" in (getattr(config, "auto_map", None)
                                                                                   or {}):
            return
        reason = "transformers has no causal-LM class for it"
    raise CBOPruneError(f"{what} (model type {model_type!r}) is not a decoder-only causal LM: {reason}; cboprune "
                        "removes blocks from decoder-only language models (Llama, Qwen, Mistral, ...)")


#: The generic fallback's last resort: gate the whole residual update of each layer.
WHOLE_LAYER = ArchSpec(branches=(), block_kinds=(), gating="layer")
WHOLE_LAYER_TEXT = "whole layer: h + α·(layer(h) − h)"


@dataclass(frozen=True)
class Block:
    index: int
    name: str  # qualified module name, e.g. "model.layers.3"
    kind: str
    branches: tuple[str, ...]  # qualified names of the gated branch modules (the layer itself: gating "layer")
    module: nn.Module
    gating: str = "branches"  # "branches": scale each branch output; "layer": h + g * (layer(h) - h)


def _get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Module) else None


def _text_config(config: Any) -> Any:
    """The decoder's config (the config itself for text-only models)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def decoder_config(model_or_config: Any) -> Any:
    return _text_config(getattr(model_or_config, "config", model_or_config))


@cache
def _log_fallback_once(model_type: str, note: str) -> None:
    log.warning("model type %r is not in the architecture table: %s (add a table entry to make this explicit, see "
                "docs/architectures.md)", model_type, note)


def arch_spec(model_or_config: Any) -> ArchSpec | None:
    """The table entry for a model or config, None for an unknown model type."""
    model_type = getattr(decoder_config(model_or_config), "model_type", "")
    if model_type in UNSUPPORTED:
        raise CBOPruneError(f"model type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")
    return ARCHITECTURES.get(model_type)


def _discover_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the decoder-layer ModuleList: element class in `_no_split_modules`, length = layer count."""
    config = decoder_config(model)
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
        raise CBOPruneError(f"cannot find the decoder layers of model type {config.model_type!r}: it is not in "
                            "the architecture table and has no ModuleList of decoder layers; add an entry for it "
                            "to cboprune/models/architectures.py (see docs/architectures.md)")
    candidates.sort(key=lambda c: (-c[0], -c[1]))
    return candidates[0][2], candidates[0][3]


#: Branch names tried for unknown model types, in this order.
_FALLBACK_BRANCHES = ("self_attn", "attention", "attn", "linear_attn", "mamba", "mixer", "mlp", "feed_forward",
                      "block_sparse_moe")
_FALLBACK_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")


def _named_branch_spec(layer: nn.Module) -> ArchSpec | None:
    """The branches an unknown layer's child names suggest (None: no known branch name)."""
    names = {name for name, _ in layer.named_children()}
    if set(_FALLBACK_POST_NORMS) <= names:  # Gemma-2 style post-norms: gate the norms
        return POST_NORM
    branches = tuple(b for b in _FALLBACK_BRANCHES if b in names)
    return _spec(branches=branches, block_kinds=()) if branches else None


#: Verdicts of the fallback check, per decoder-layer ModuleList: (spec, one-line note).
_FALLBACK_VERDICTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fallback_spec(model: nn.Module, path: str, layers: nn.ModuleList) -> tuple[ArchSpec, str]:
    """Gate the named branches if that passes the check on the real model, else the whole layer."""
    if layers in _FALLBACK_VERDICTS:
        return _FALLBACK_VERDICTS[layers]
    named = _named_branch_spec(layers[0])
    where = f"decoder layers discovered at {path!r}"
    verdict = None
    if named is not None:
        problem = check_gates(model, _make_blocks(model, named, path, layers))
        if problem is None:
            verdict = named, (f"{where}; gating branches {list(named.branches)} passed the check (all gates at 0 "
                              "give the identity, all at 1 reproduce the model)")
        else:
            reason = f"gating branches {list(named.branches)} failed the check ({problem})"
    else:
        reason = "no residual branch has a known name"
    if verdict is None:
        problem = check_gates(model, _make_blocks(model, WHOLE_LAYER, path, layers))
        if problem is not None:
            raise CBOPruneError(f"model type {decoder_config(model).model_type!r} is not in the architecture table "
                                f"and cannot be gated generically: {reason}, and gating the whole layer failed too "
                                f"({problem}); add an entry to cboprune/models/architectures.py")
        verdict = WHOLE_LAYER, (f"{where}; {reason}, so each layer's whole residual update h + α·(layer(h) − h) is "
                                "gated (exact at α = 0 and 1, checked)")
    _FALLBACK_VERDICTS[layers] = verdict
    return verdict


def resolve(model: nn.Module) -> tuple[ArchSpec, str, nn.ModuleList]:
    """(spec, qualified name of the decoder-layer ModuleList, the ModuleList); table first, then discovery.

    For a model type not in the table the decoder layers are discovered, and the gates are checked
    on the real model (`gating.check_gates`): the named branches if they pass, else the whole layer.
    """
    spec = arch_spec(model)
    if spec is not None:
        layers = _get_submodule(model, spec.layers)
        if isinstance(layers, nn.ModuleList):
            return spec, spec.layers, layers
        raise CBOPruneError(f"model type {decoder_config(model).model_type!r}: no decoder-layer ModuleList at "
                            f"{spec.layers!r} (architecture table entry does not match this model class "
                            f"{type(model).__name__})")
    path, layers = _discover_layers(model)
    spec, note = _fallback_spec(model, path, layers)
    _log_fallback_once(decoder_config(model).model_type, note)
    return spec, path, layers


def gating_summary(model: nn.Module) -> str:
    """One line: where the gates of `model` come from (table entry or checked fallback) and what they scale."""
    spec, path, layers = resolve(model)
    model_type = decoder_config(model).model_type
    if arch_spec(model) is not None:
        return (f"model type {model_type!r} from the architecture table: decoder layers at {path!r}, gated branches "
                f"{list(spec.branches)}")
    return f"model type {model_type!r} not in the architecture table: {_FALLBACK_VERDICTS[layers][1]}"


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's decoder blocks."""
    _, path, layers = resolve(model)
    return path, layers


def _layer_values(config: Any, name: str, n: int) -> list[Any] | None:
    value = getattr(config, name, None)
    if isinstance(value, (list, tuple, str)) and len(value) == n:
        return list(value)
    return None


def block_kinds(config: Any, spec: ArchSpec | None = None, n_blocks: int | None = None) -> list[str]:
    """Each block's kind, read from the config alone (so surgery can check the rewritten config)."""
    config = decoder_config(config)
    spec = spec or arch_spec(config) or DENSE
    rule = spec.kinds
    n = n_blocks if n_blocks is not None else _num_blocks(config, spec)
    mixers = _layer_values(config, rule.field, n) if rule.field else None
    moe = MOE_LAYOUTS[rule.moe] if rule.moe else None
    kinds = []
    for i in range(n):
        mixer = rule.mixer if mixers is None else rule.values.get(mixers[i], str(mixers[i]))
        parts = [p for p in mixer.split("+") if p]
        if moe is not None and moe(config, i) and "moe" not in parts:
            parts.append("moe")
        kinds.append("+".join(parts) or "mlp")
    return kinds


def _num_blocks(config: Any, spec: ArchSpec) -> int:
    for name in (*spec.count_fields, "num_hidden_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise CBOPruneError(f"model type {getattr(config, 'model_type', '?')!r}: the config has none of the block "
                        f"count fields {spec.count_fields}")


def _make_blocks(model: nn.Module, spec: ArchSpec, path: str, layers: nn.ModuleList) -> list[Block]:
    kinds = block_kinds(model, spec, len(layers))
    out = []
    for i, layer in enumerate(layers):
        if spec.gating == "layer":
            branches: tuple[str, ...] = ("",)
        else:
            branches = tuple(b for b in spec.branches if _get_submodule(layer, b) is not None)
        if not branches:
            raise CBOPruneError(
                f"block {path}.{i} of model type {decoder_config(model).model_type!r} has none of the residual "
                f"branches {spec.branches}: add an entry for this type to cboprune/models/architectures.py")
        out.append(Block(index=i, name=f"{path}.{i}", kind=kinds[i],
                         branches=tuple(f"{path}.{i}.{b}".rstrip(".") for b in branches), module=layer,
                         gating=spec.gating))
    return out


def blocks(model: nn.Module) -> list[Block]:
    """The model's decoder blocks in order, with kind and the branch modules to gate."""
    spec, path, layers = resolve(model)
    return _make_blocks(model, spec, path, layers)


def kind_matches(kind: str, only: Iterable[str]) -> bool:
    """Whether a block kind has one of the parts in `only` ("moe" matches "attention+moe")."""
    parts = set(kind.split("+"))
    return any(o == kind or o in parts for o in only)


def removable_blocks(kinds: Sequence[str], only: Sequence[str] | None = None,
                     keep: Iterable[int] = ()) -> list[int] | None:
    """Indices of the blocks the solver may remove: of a kind in `only` (None: any) and not in `keep`.

    Returns None when nothing restricts removal. Raises for a kind no block has.
    """
    n = len(kinds)
    keep = {i + n if i < 0 else i for i in keep}
    if not only:
        return None if not keep else [i for i in range(n) if i not in keep]
    present = sorted({p for k in kinds for p in k.split("+")} | set(kinds))
    unknown = [o for o in only if o not in present]
    if unknown:
        raise CBOPruneError(f"no block of kind {', '.join(map(repr, unknown))} in this model: its blocks are of "
                            f"kinds {', '.join(sorted(set(kinds)))} (parts: {', '.join(present)})")
    return [i for i, k in enumerate(kinds) if kind_matches(k, only) and i not in keep]


def count_field(model_or_config: Any) -> str:
    spec = arch_spec(model_or_config) or DENSE
    return spec.count_fields[0]


def layer_fields(config: Any) -> tuple[str, ...]:
    spec = arch_spec(config) or DENSE
    return spec.layer_fields


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(model: nn.Module) -> list[dict]:
    """One row per block for reports: index, name, kind, gating mode, gated branches, parameters."""
    return [{"index": b.index, "name": b.name, "kind": b.kind, "gating": b.gating,
             "branches": [WHOLE_LAYER_TEXT] if b.gating == "layer" else [n.rsplit(".", 1)[-1] for n in b.branches],
             "params": num_parameters(b.module)} for b in blocks(model)]


def supported_architectures() -> list[dict[str, Any]]:
    """One row per table entry: model type, layer path, gated branches, block kinds, rewritten fields."""
    rows = []
    for model_type, spec in sorted(ARCHITECTURES.items()):
        fields = [*spec.count_fields, *spec.layer_fields, *spec.index_fields]
        rows.append({"model_type": model_type, "layers": spec.layers, "branches": list(spec.branches),
                     "block_kinds": list(spec.block_kinds), "config_fields": fields,
                     "relayouts": list(spec.relayouts)})
    return rows


__all__ = ["ARCHITECTURES", "DENSE", "ENCODER_ONLY", "KIND_PARTS", "MOE_LAYOUTS", "WHOLE_LAYER", "ArchSpec", "Block",
           "Kinds", "block_kinds", "blocks", "check_decoder_only", "decoder_config", "decoder_layers", "describe",
           "gating_summary", "kind_matches", "removable_blocks", "resolve", "supported_architectures"]
