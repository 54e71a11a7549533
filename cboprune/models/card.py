"""Checkpoints that ship: the save dtype, and a Hugging Face model card (README.md) for each one.

`save_weights(model, out_dir, provenance, save_dtype)` writes the weights in the source model's
dtype by default (bfloat16 for a GGUF source, see `source_dtype`), without changing the model in
memory; `write_model_card(out_dir, provenance, model)` writes `README.md`: a YAML header
(`base_model`, `library_name: transformers`, `tags`, `license` when known, `pipeline_tag`) and a
body with what was removed, the method, parameters before and after, measured numbers when the
provenance carries them (`evaluation`, `speedup`), the command and how to load the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from cboprune.models.architectures import resolve
from cboprune.core.distributed import resolve_dtype
from cboprune.core.version import __version__

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
# The default model (cboprune.models.loading.DEFAULT_MODEL) is the GGUF build of this hub model.
DEFAULT_BASE = {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "license": "apache-2.0"}
# GGUF weights are quantized (Q4_1: 4-bit codes with float16 scales) and de-quantized to float32 on
# load. bfloat16's rounding (relative 2^-9) is far below the quantization step already in the
# weights, halves the checkpoint, and is the dtype SmolLM2 and most current LLMs are published in;
# float16 would keep slightly more mantissa but risks overflow in activations of larger models.
GGUF_SAVE_DTYPE = torch.bfloat16
_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


# --- dtype ----------------------------------------------------------------------------------------------
def _config_dtype(config_file: Path) -> torch.dtype | None:
    try:
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    return _NAMES.get(str(name)) if name else None


def source_dtype(source: str | None) -> torch.dtype | None:
    """The dtype the source model is published in: its config.json's `dtype`, bfloat16 for GGUF
    files (and the default model); None when unknown (a hub id not in the local cache)."""
    if not source:
        return None
    if source == "default" or source.endswith(".gguf"):
        return GGUF_SAVE_DTYPE
    path = Path(source).expanduser()
    if path.is_dir():
        return _config_dtype(path / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "config.json")
    except Exception:  # noqa: BLE001  (not a valid repo id)
        return None
    return _config_dtype(Path(cached)) if isinstance(cached, str) else None


def resolve_save_dtype(save_dtype: str | torch.dtype | None, model: nn.Module, provenance: dict[str, Any]) -> torch.dtype:
    """`save_dtype` ("auto"/None: the source model's dtype, else the model's own)."""
    if isinstance(save_dtype, torch.dtype):
        return save_dtype
    if save_dtype not in (None, "auto"):
        return resolve_dtype(save_dtype)
    found = source_dtype(provenance.get("source_model"))
    own = next(model.parameters()).dtype
    if found is None:
        log.info("source dtype unknown: saving in the model's dtype %s", own)
    return found or own


def save_weights(model: nn.Module, out_dir: str | Path, provenance: dict[str, Any],
                 save_dtype: str | torch.dtype | None = None) -> torch.dtype:
    """`model.save_pretrained(out_dir)` with floating-point weights cast to the save dtype.

    The model in memory is not changed (a cast copy of the state dict is saved; tied tensors stay
    tied), and config.json records the saved dtype so `from_pretrained(dtype="auto")` gets it back.
    """
    dtype = resolve_save_dtype(save_dtype, model, provenance)
    out_dir = Path(out_dir)
    memo: dict[tuple, torch.Tensor] = {}
    state = {}
    for key, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            ident = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride())  # tied weights: one copy
            tensor = memo.setdefault(ident, tensor.to(dtype))
        state[key] = tensor
    model.save_pretrained(out_dir, state_dict=state)
    config_file = out_dir / "config.json"
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    cfg["dtype"] = name
    for value in cfg.values():  # nested text/vision configs of multimodal models
        if isinstance(value, dict) and "dtype" in value:
            value["dtype"] = name
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dtype


# --- model card -----------------------------------------------------------------------------------------
def _source_card(source: str | None) -> dict[str, Any]:
    """base_model and license of the source: known for the default model, else from its own card."""
    if not source:
        return {}
    if source == "default":
        return dict(DEFAULT_BASE)
    path = Path(source).expanduser()
    if path.exists():
        meta = read_card_metadata(path / CARD_FILE) if path.is_dir() else {}
        out = {k: meta[k] for k in ("license",) if k in meta}
        if meta.get("base_model") and (path / "removal.json").is_file():
            out["base_model"] = meta["base_model"]  # a pruned checkpoint: its own base
        return out
    if source.count("/") == 1:  # a hub id
        out = {"base_model": source}
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source, CARD_FILE)
            if isinstance(cached, str) and "license" in (meta := read_card_metadata(Path(cached))):
                out["license"] = meta["license"]
        except Exception:  # noqa: BLE001
            pass
        return out
    return {}


def read_card_metadata(path: str | Path) -> dict[str, Any]:
    """The YAML front matter of a model card ({} when there is none)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        meta = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _params_before(model: nn.Module, provenance: dict[str, Any]) -> int | None:
    if isinstance(provenance.get("params_original"), int):
        return provenance["params_original"]
    try:  # exact when the kept blocks all have the same size (the removed ones then had it too)

        sizes = {sum(p.numel() for p in layer.parameters()) for layer in resolve(model)[2]}
    except Exception:  # noqa: BLE001
        return None
    n_removed = len(provenance.get("removed", []))
    return sum(p.numel() for p in model.parameters()) + n_removed * sizes.pop() if len(sizes) == 1 else None


def _command(provenance: dict[str, Any]) -> str | None:
    if provenance.get("command"):
        return str(provenance["command"])
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    if argv0 == "cboprune" or argv0 == "cli.py" and "cboprune" in sys.argv[0]:
        return "cboprune " + shlex.join(sys.argv[1:])
    return None


def _how_chosen(method: str | None) -> str:
    if not method or method == "explicit":
        return "chosen by hand"
    if method.lower().startswith("cbo"):
        return ("chosen by constrained binary optimization over a second-order model of the loss in "
                "per-block gates")
    return f"chosen by the {method} criterion"


def _fmt_metric(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _measured(provenance: dict[str, Any]) -> list[str]:
    lines = []
    ev = provenance.get("evaluation")
    if isinstance(ev, dict) and ev:
        lines += ["", "## Evaluation", "", "| task | metric | value |", "|---|---|---:|"]
        for task, metrics in ev.items():
            metrics = metrics.get("metrics", metrics) if isinstance(metrics, dict) else {"value": metrics}
            lines += [f"| {task} | {m} | {_fmt_metric(v)} |" for m, v in metrics.items()]
    sp = provenance.get("speedup")
    if isinstance(sp, dict) and sp:
        lines += ["", "## Measured speed", "",
                  f"Prefill {sp.get('prefill_speedup', float('nan')):.2f}×, decode "
                  f"{sp.get('decode_speedup', float('nan')):.2f}× the original's speed on {sp.get('device', '?')} "
                  "(median of paired ratios, `cboprune bench`)."]
    return lines


def render_model_card(provenance: dict[str, Any], model: nn.Module | None = None, *,
                      dtype: torch.dtype | None = None, extra: dict[str, Any] | None = None) -> str:
    """The README.md text (YAML front matter + markdown) for a pruned checkpoint."""

    source = provenance.get("source_model")
    meta: dict[str, Any] = {**_source_card(source), **(extra or {})}
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                 "tags": ["pruning", "cboprune", "block-removal"] + (["distillation"] if provenance.get("healed") else [])})
    header = yaml.safe_dump({k: meta[k] for k in ("base_model", "license", "library_name", "pipeline_tag", "tags")
                             if k in meta}, sort_keys=False)
    removed, n_orig = provenance.get("removed", []), provenance.get("n_blocks_original")
    base = meta.get("base_model") or source or "the source model"
    body = [f"# {base} with {len(removed)} of {n_orig or '?'} blocks removed", "",
            f"Made with cboprune {provenance.get('cboprune_version', __version__)}: whole transformer blocks "
            f"removed, {_how_chosen(provenance.get('method'))}.", "", "## What was removed", "",
            f"- blocks (original indices): {', '.join(map(str, removed)) or '—'}"]
    if provenance.get("removed_kinds"):
        counts = Counter(provenance["removed_kinds"])
        body.append(f"- their kinds: {', '.join(f'{n} × {k}' for k, n in counts.items())}")
    body.append(f"- method: {provenance.get('method', 'explicit')}; energy model: {provenance.get('energy_model', '—')}; "
                f"state rank {provenance.get('state_rank', '—')}")
    for key, label in (("energy", "energy"), ("heldout_nll", "held-out NLL")):
        if isinstance(provenance.get(key), (int, float)):
            body.append(f"- {label}: {provenance[key]:.6g}")
    if model is not None:
        after = sum(p.numel() for p in model.parameters())
        before = _params_before(model, provenance)
        share = f" ({100 * (1 - after / before):.1f}% fewer)" if before else ""
        body.append(f"- parameters: {before / 1e6:.2f} M → {after / 1e6:.2f} M{share}" if before
                    else f"- parameters: {after / 1e6:.2f} M")
    if dtype is not None:
        body.append(f"- saved in {str(dtype).removeprefix('torch.')}")
    body += _measured(provenance)
    command = _command(provenance)
    if command:
        body += ["", "## How it was made", "", "```bash", command, "```"]
    body += ["", "## How to use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             'path = "."  # this folder, or its hub id once uploaded',
             'model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")',
             "tokenizer = AutoTokenizer.from_pretrained(path)",
             'messages = [{"role": "user", "content": "What is pruning?"}]',
             "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\",",
             "                                       return_dict=True)",
             "out = model.generate(**inputs, max_new_tokens=50)",
             "print(tokenizer.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", "",
             "A normal transformers checkpoint: the config lists the remaining blocks, nothing custom is "
             "needed to load it. `removal.json` next to it records the full provenance.", ""]
    return f"---\n{header}---\n\n" + "\n".join(body)


def write_model_card(out_dir: str | Path, provenance: dict[str, Any], model: nn.Module | None = None, *,
                     dtype: torch.dtype | None = None) -> Path:
    """Write `README.md` into the checkpoint folder `out_dir`; return its path."""
    path = Path(out_dir) / CARD_FILE
    path.write_text(render_model_card(provenance, model, dtype=dtype), encoding="utf-8")
    return path
