"""Which GGUF metadata depends on depth, per architecture, as data (the GGUF side of
`models/architectures.py`).

A GGUF file says how deep the model is in `<arch>.block_count`, in per-layer arrays (one value per
block, e.g. head counts that differ by layer) and, for some architectures, nowhere at all: llama.cpp
derives a per-layer property from the layer index. Removing blocks renumbers the kept ones, so an
index-derived property would silently move to other layers. For each such property this table
records the rule llama.cpp applies (as in the llama.cpp bundled with llama-cpp-python 0.3.36,
`llama_model_base::load_swa_pattern` and the per-model `load_arch_hparams`) and the key, if any,
that overrides it; `plan_metadata` then writes the kept blocks' pattern explicitly, or refuses the
removal when no key can express it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cboprune.core.errors import CBOPruneError


@dataclass(frozen=True)
class IndexRule:
    """A per-layer property llama.cpp derives from the layer index `il` of an n-layer model.

    period: llama.cpp's `n_pattern`; flag(il) is `il % period < period - 1` (the last layer of
    every period is the odd one out, llama.cpp's default) or, with dense_first, `il % period != 0`.
    key: the metadata key (under `<arch>.`) that overrides the rule: llama.cpp reads it as a
    per-layer array, or as an integer period; None: nothing overrides it.
    when: the rule applies only when this key is present and > 0 (e.g. Gemma-3 without a sliding
    window has no sliding layers at all).
    """

    name: str
    period: int
    key: str | None
    dense_first: bool = False
    when: str | None = None

    def flags(self, n_layers: int, period: int | None = None) -> list[bool]:
        p = self.period if period is None else period
        if p == 0:
            return [True] * n_layers
        if self.dense_first:
            return [il % p != 0 for il in range(n_layers)]
        return [il % p < p - 1 for il in range(n_layers)]


#: keys under `<arch>.` that llama.cpp reads per layer (an array of block_count values or one
#: value for all): sliced to the kept blocks when they are arrays
PER_LAYER_KEYS = (
    "attention.head_count", "attention.head_count_kv", "feed_forward_length", "expert_feed_forward_length",
    "expert_used_count", "attention.sliding_window_pattern", "swiglu_clamp_exp", "swiglu_clamp_shexp",
)

_SWA = "attention.sliding_window_pattern"

#: GGUF architecture -> the index rules llama.cpp applies to it (empty: every layer alike)
ARCHITECTURES: dict[str, tuple[IndexRule, ...]] = {
    "llama": (), "qwen2": (), "qwen2moe": (), "qwen3": (), "qwen3moe": (), "gemma": (), "phi3": (),
    "granite": (), "starcoder2": (), "stablelm": (), "internlm2": (), "olmo": (),
    "gemma2": (IndexRule("sliding-window layers", 2, _SWA),),
    "gemma3": (IndexRule("sliding-window layers", 6, _SWA, when="attention.sliding_window"),),
    "cohere2": (IndexRule("sliding-window layers", 4, _SWA),),
    "olmo2": (IndexRule("sliding-window layers", 4, _SWA, when="attention.sliding_window"),),
    "exaone4": (IndexRule("sliding-window layers", 4, _SWA, when="attention.sliding_window"),),
    # smollm3.cpp: `n_no_rope_layer_step = 4`, hard-coded; no key overrides it
    "smollm3": (IndexRule("layers without RoPE (NoPE)", 4, None),),
}


#: GGUF architecture -> {block_count: what llama.cpp sets from that depth alone}: llama.cpp keys some
#: hyper-parameters on the layer count itself, so a model of that depth cannot change depth
DEPTH_IMPLIED: dict[str, dict[int, str]] = {
    # gemma3.cpp: the 62-layer 27B scales attention by 1/sqrt(hidden / heads), every other depth
    # by 1/sqrt(head_dim); no key overrides it
    "gemma3": {62: "attention scale (1/sqrt(hidden/heads) for 62 layers, 1/sqrt(head_dim) otherwise)"},
}


def check_architecture(arch: str, path: object) -> tuple[IndexRule, ...]:
    if arch not in ARCHITECTURES:
        raise CBOPruneError(f"GGUF file {path} is of architecture {arch!r}, whose depth-dependent metadata cboprune "
                            f"does not know: blocks can be removed from {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch]


def _as_flags(value: object, n_layers: int, rule: IndexRule) -> list[bool]:
    """The per-layer flags llama.cpp reads from an override key (an array or an integer period)."""
    if isinstance(value, list):
        return [bool(v) for v in value][:n_layers] + [False] * max(0, n_layers - len(value))
    return rule.flags(n_layers, int(value))


def plan_metadata(arch: str, fields: dict[str, object], n_layers: int, kept: list[int],
                  path: object) -> dict[str, object]:
    """The `<arch>.` keys to write for a model that keeps blocks `kept` (old indices, ascending) of
    `n_layers`: {key: new value}, where a value of None deletes the key. `fields` maps every
    metadata key to its value (arrays as lists). Raises a one-line error, before anything is
    written, when the kept blocks' layer pattern cannot be expressed in this architecture's metadata."""
    rules = check_architecture(arch, path)
    n_new = len(kept)
    implied = DEPTH_IMPLIED.get(arch, {}).get(n_layers)
    if implied and n_new != n_layers:
        raise CBOPruneError(f"cannot remove blocks from this {n_layers}-block {arch} GGUF: llama.cpp derives its "
                            f"{implied} from the block count itself, so a shallower file would compute another model")
    plan: dict[str, object] = {f"{arch}.block_count": n_new}
    prefix = f"{arch}."
    for key, value in fields.items():
        if not key.startswith(prefix) or not isinstance(value, list) or len(value) != n_layers:
            continue
        short = key[len(prefix):]
        if short in PER_LAYER_KEYS:
            plan[key] = [value[i] for i in kept]
        elif n_layers > 1:
            raise CBOPruneError(f"GGUF file {path}: metadata array {key} has one value per block ({n_layers}) but "
                                "cboprune does not know whether it is per-layer, so it cannot rewrite it; refusing "
                                "rather than writing a model llama.cpp would misread")
    for rule in rules:
        if rule.when is not None and not _positive(fields.get(prefix + rule.when)):
            continue
        override = fields.get(prefix + rule.key) if rule.key else None
        before = _as_flags(override, n_layers, rule) if override is not None else rule.flags(n_layers)
        want = [before[i] for i in kept]
        # what llama.cpp derives for the new depth if nothing but block_count changes
        derived = _as_flags(override, n_new, rule) if override is not None and not isinstance(override, list) \
            else rule.flags(n_new)
        if isinstance(plan.get(prefix + (rule.key or "")), list):
            continue  # the sliced per-layer array already says it
        if want == derived:
            continue
        if rule.key is None:
            odd = [i for i, f in zip(kept, want) if not f]
            raise CBOPruneError(
                f"cannot remove these blocks from this {arch} GGUF: llama.cpp derives its {rule.name} from the layer "
                f"index (every {rule.period}th) and no metadata key overrides it, so the kept blocks' pattern "
                f"(odd ones out at old blocks {odd}) would move to other layers; keep the pattern (e.g. remove whole "
                f"groups of {rule.period} consecutive blocks aligned to it)")
        plan[prefix + rule.key] = want
    return plan


def _positive(value: object) -> bool:
    try:
        return value is not None and float(value) > 0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


__all__ = ["ARCHITECTURES", "DEPTH_IMPLIED", "PER_LAYER_KEYS", "IndexRule", "check_architecture", "plan_metadata"]
