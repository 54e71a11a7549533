"""`cboprune bench ORIGINAL PRUNED...`: size and speed of pruned models, measured next to the original.

    cboprune bench default out/pruned/M8-rank0 out/pruned/M12-rank0 -o out/bench
    cboprune bench default ./pruned --batch-sizes 1,8 --lengths 128,512 --device cpu,cuda

Per model: parameters (and how many sit in the embedding and LM head, which pruning does not
shrink), weight bytes in memory and on disk. Per model, device, batch size B and prompt length
L: prefill tokens/s (one forward over B x L tokens, logits of the last position only), decode
tokens/s and per-token latency (N greedy steps with the KV cache, B tokens per step), the KV
cache's size after those steps and, on CUDA, the peak memory allocated above the weights (CPU
has no allocator statistics; the peak is not guessed there). The models are measured alternately within every repetition
(the order reversed each repetition), so load drift on a shared machine hits all of them alike;
a speed-up is the median over repetitions of the paired ratio original time / pruned time, with
its min and max. Library: `bench_models()` for any number of in-memory models and
`measure_speedup(original, pruned)` for the one figure a report needs.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cboprune.data.calibration import model_context
from cboprune.core.errors import CBOPruneError
from cboprune.models.architectures import resolve
from cboprune.core.outputs import dumps_strict, write_texts

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class BenchSettings:
    batch_sizes: tuple[int, ...] = (1, 8)
    lengths: tuple[int, ...] = (128, 512)
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    devices: tuple[str, ...] = ("cpu",)
    seed: int = 0
    memory: bool = True  # one extra untimed pass per shape: KV cache size, CUDA peak memory

    def check(self) -> None:
        problems = run_problems({"--batch-sizes": self.batch_sizes, "--lengths": self.lengths}, self.new_tokens,
                                self.repeats, self.warmup)
        if problems:
            raise CBOPruneError("; ".join(problems))


def default_devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


# --- sizes ----------------------------------------------------------------------------------------------
def disk_bytes(checkpoint_dir: str | os.PathLike | None) -> int | None:
    """Bytes of the weight files (safetensors, bin, gguf) in a checkpoint folder, or of one file."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir)
    if path.is_file():
        return path.stat().st_size
    files = [p for p in path.glob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
    return sum(p.stat().st_size for p in files) if files else None


def model_stats(model: nn.Module) -> dict[str, Any]:
    """Parameters (tied weights counted once), the embedding + LM head share, blocks, weight bytes."""
    params = list(model.parameters())  # shared tensors appear once
    n_params = sum(p.numel() for p in params)
    emb_ids: set[int] = set()
    n_emb = 0
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        for p in (module.parameters() if module is not None else ()):
            if id(p) not in emb_ids:
                emb_ids.add(id(p))
                n_emb += p.numel()
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    weight_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    n_blocks = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    try:
        n_blocks = len(resolve(model)[2])
    except Exception:  # noqa: BLE001  (an architecture outside the table: the config's count)
        pass
    dtype = str(params[0].dtype).removeprefix("torch.") if params else None
    return {"params": n_params, "params_embedding_and_head": n_emb, "params_blocks_and_rest": n_params - n_emb,
            "blocks": n_blocks, "weight_bytes": weight_bytes, "dtype": dtype}


# --- timing ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_name(model: nn.Module) -> str:
    """The forward argument that takes the KV cache (`cache` from transformers 5.24, before: `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _forward(model: nn.Module, ids: torch.Tensor, cache_name: str, past: Any = None) -> tuple[torch.Tensor, Any]:
    """(last-position logits [B, 1, V], the cache) of one forward with the cache on."""
    kwargs = {"input_ids": ids, "use_cache": True, cache_name: past}
    try:  # logits of the last position only, as generation needs (no [B, L, V] tensor)
        out = model(**kwargs, logits_to_keep=1)
    except TypeError:
        out = model(**kwargs)
    cache = getattr(out, "cache", None)
    return out.logits[:, -1:], cache if cache is not None else out.past_key_values


@torch.inference_mode()
def time_generation(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds): one forward over `ids` [B, L], then `new_tokens` greedy
    steps of one token per row with the KV cache."""
    device, name = ids.device, _cache_name(model)
    _sync(device)
    t0 = time.perf_counter()
    logits, past = _forward(model, ids, name)
    nxt = logits.argmax(-1)  # [B, 1]
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits, past = _forward(model, nxt, name, past)
        nxt = logits.argmax(-1)
    _sync(device)
    return t1 - t0, time.perf_counter() - t1


def tensor_bytes(obj: Any, _seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor reachable from `obj` (a KV cache object, its layers, lists)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        children = list(vars(obj).values())
    else:
        return 0
    return sum(tensor_bytes(c, seen) for c in children)


@torch.inference_mode()
def memory_run(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> dict[str, int | None]:
    """One prefill + decode run: the KV cache's bytes at the end (measured on the cache's tensors)
    and, on CUDA, the peak bytes allocated above what was allocated before (torch's allocator).
    CPU has no allocator statistics: the peak is left None rather than guessed."""
    device, name = ids.device, _cache_name(model)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    logits, past = _forward(model, ids, name)
    for _ in range(new_tokens):
        logits, past = _forward(model, logits.argmax(-1), name, past)
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    return {"kv_cache_bytes": tensor_bytes(past), "peak_above_weights_bytes": peak}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def _shape_inputs(vocab_size: int, batch: int, length: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 7919 * batch + length)
    return torch.randint(0, vocab_size, (batch, length), generator=gen).to(device)


def _check_context(models: dict[str, nn.Module], settings: BenchSettings) -> int:
    vocab = min(m.config.vocab_size for m in models.values())
    need = max(settings.lengths) + settings.new_tokens
    for name, m in models.items():
        limit = getattr(m.config, "max_position_embeddings", None)
        if limit is not None and need > limit:
            raise CBOPruneError(f"--lengths {max(settings.lengths)} + --new-tokens {settings.new_tokens} exceeds the "
                                f"context of {name} ({limit} positions): lower them")
    return vocab


def _measure_device(models: dict[str, nn.Module], settings: BenchSettings, device: torch.device,
                    vocab: int) -> list[dict[str, Any]]:
    names = list(models)
    shapes = [(b, length) for b in settings.batch_sizes for length in settings.lengths]
    inputs = {s: _shape_inputs(vocab, *s, settings.seed, device) for s in shapes}
    times: dict[tuple, dict[str, list[tuple[float, float]]]] = {s: {n: [] for n in names} for s in shapes}
    for i in range(settings.warmup + settings.repeats):
        order = names if i % 2 == 0 else names[::-1]
        for shape in shapes:
            for name in order:
                t = time_generation(models[name], inputs[shape], settings.new_tokens)
                if i >= settings.warmup:
                    times[shape][name].append(t)
        log.info("bench %s: %s %d/%d done", device, "repetition" if i >= settings.warmup else "warm-up",
                 i + 1 - settings.warmup if i >= settings.warmup else i + 1,
                 settings.repeats if i >= settings.warmup else settings.warmup)
    rows = []
    for shape in shapes:
        b, length = shape
        for name in names:
            prefill = [p for p, _ in times[shape][name]]
            decode = [d for _, d in times[shape][name]]
            row = {"device": str(device), "model": name, "batch_size": b, "length": length,
                   "new_tokens": settings.new_tokens, "prefill_s": _spread(prefill), "decode_s": _spread(decode),
                   "prefill_tokens_per_s": _spread([b * length / p for p in prefill]),
                   "decode_tokens_per_s": _spread([b * settings.new_tokens / d for d in decode]),
                   "per_token_latency_ms": _spread([1000 * d / settings.new_tokens for d in decode])}
            if settings.memory:
                row.update(memory_run(models[name], inputs[shape], settings.new_tokens))
            if name != names[0]:
                ref = times[shape][names[0]]
                row["prefill_speedup"] = _spread([r[0] / t[0] for r, t in zip(ref, times[shape][name])])
                row["decode_speedup"] = _spread([r[1] / t[1] for r, t in zip(ref, times[shape][name])])
            rows.append(row)
    return rows


def bench_models(models: dict[str, nn.Module], settings: BenchSettings | None = None, *,
                 disk: dict[str, int | None] | None = None) -> dict[str, Any]:
    """Measure every model (the first is the reference) on every device of `settings`.

    Models are moved to each device in turn and back to where they were. Returns a JSON-able
    dict: `models` (sizes), `runs` (one row per device x model x shape), `settings`, `machine`.
    """
    settings = settings or BenchSettings(devices=default_devices())
    settings.check()
    if len(models) < 2:
        raise CBOPruneError("bench needs the original model and at least one pruned model")
    vocab = _check_context(models, settings)
    stats = {}
    ref = None
    for name, model in models.items():
        s = model_stats(model)
        s["disk_bytes"] = (disk or {}).get(name)
        ref = ref or s
        s["params_ratio"] = s["params"] / ref["params"]
        s["params_removed"] = ref["params"] - s["params"]
        stats[name] = s
    homes = {name: next(m.parameters()).device for name, m in models.items()}
    was_training = {name: m.training for name, m in models.items()}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    runs: list[dict[str, Any]] = []
    started = time.time()
    try:
        for dev in settings.devices:
            device = torch.device(dev)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise CBOPruneError(f"--device {dev}: CUDA is not available here; use --device cpu")
            for m in models.values():
                m.to(device).eval()
            runs += _measure_device(models, settings, device, vocab)
    finally:
        for name, m in models.items():
            m.to(homes[name]).train(was_training[name])
    return {"models": stats, "runs": runs, "settings": asdict(settings), "machine": _machine(load_before, started)}


def _machine(load_before: tuple | None, started: float) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "seconds": round(time.time() - started, 1)}
    if load_before is not None:
        info["load_average_before"] = [round(x, 2) for x in load_before]
        info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def measure_speedup(original: nn.Module, pruned: nn.Module, *, batch_sizes: Sequence[int] = (1,),
                    lengths: Sequence[int] = (128,), new_tokens: int = 16, repeats: int = 3,
                    device: str | None = None) -> dict[str, Any]:
    """Measured size and speed of `pruned` against `original` (in-memory models), for reports.

    Returns `{"params_original", "params_pruned", "params_removed", "params_removed_fraction",
    "prefill_speedup", "decode_speedup", "device", "runs", "settings"}`; the speed-ups are the
    medians over shapes of the per-shape paired-ratio medians (>1: the pruned model is faster).
    """
    dev = device or str(next(original.parameters()).device)
    settings = BenchSettings(batch_sizes=tuple(batch_sizes), lengths=tuple(lengths), new_tokens=new_tokens,
                             repeats=repeats, devices=(dev,), memory=False)
    report = bench_models({"original": original, "pruned": pruned}, settings)
    rows = [r for r in report["runs"] if r["model"] == "pruned"]
    a, b = report["models"]["original"], report["models"]["pruned"]
    return {"params_original": a["params"], "params_pruned": b["params"], "params_removed": b["params_removed"],
            "params_removed_fraction": b["params_removed"] / a["params"],
            "prefill_speedup": statistics.median(r["prefill_speedup"]["median"] for r in rows),
            "decode_speedup": statistics.median(r["decode_speedup"]["median"] for r in rows),
            "device": dev, "runs": report["runs"], "settings": report["settings"]}


# --- report ---------------------------------------------------------------------------------------------
def _mb(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:.1f}"


def _cell(s: dict[str, float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def markdown_report(report: dict[str, Any]) -> str:
    """Sizes, then one speed table per device; cells are median (min–max) over repetitions."""
    lines = ["| model | blocks | parameters | removed | embedding + head | weights MB | on disk MB | dtype |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in report["models"].items():
        lines.append(f"| {name} | {s['blocks']} | {s['params'] / 1e6:.2f} M | {100 * (1 - s['params_ratio']):.1f}% "
                     f"| {s['params_embedding_and_head'] / 1e6:.2f} M | {_mb(s['weight_bytes'])} "
                     f"| {_mb(s['disk_bytes'])} | {s['dtype']} |")
    for device in dict.fromkeys(r["device"] for r in report["runs"]):
        lines += ["", f"**{device}** — median (min–max) of {report['settings']['repeats']} repetitions, "
                  f"{report['settings']['new_tokens']} decode steps", "",
                  "| model | B | L | prefill tok/s | decode tok/s | ms / token | KV cache MB | peak above weights MB "
                  "| prefill speed-up | decode speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in report["runs"] if r["device"] == device):
            up = [_cell(r[k], "{:.2f}") + "×" if k in r else "1" for k in ("prefill_speedup", "decode_speedup")]
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['length']} | {_cell(r['prefill_tokens_per_s'])} "
                         f"| {_cell(r['decode_tokens_per_s'])} | {_cell(r['per_token_latency_ms'], '{:.2f}')} "
                         f"| {_mb(r.get('kv_cache_bytes'))} | {_mb(r.get('peak_above_weights_bytes'))} "
                         f"| {up[0]} | {up[1]} |")
    m = report["machine"]
    load = f", load average {m['load_average_before'][0]} → {m['load_average_after'][0]}" if "load_average_before" in m else ""
    lines += ["", f"torch {m['torch']}, {m['threads']} threads, {m['cpu_count']} CPUs{load}"
              + (f", {m['cuda_device']}" if "cuda_device" in m else "") + f"; {m['seconds']} s", ""]
    return "\n".join(lines)


# --- command --------------------------------------------------------------------------------------------
def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,8, got {text!r}") from None


def speedup_summary(original: torch.nn.Module, pruned: torch.nn.Module) -> dict[str, Any]:
    """Parameters removed and the measured prefill / decode speed-up (batch 1, 128 prompt tokens or what
    the context allows, 16 decoded, 3 repeats)."""

    context = (model_context(original) or (4096, ""))[0]
    new_tokens = min(16, max(1, context // 8))
    sp = measure_speedup(original, pruned, lengths=(min(128, context - new_tokens),), new_tokens=new_tokens)
    return {k: v for k, v in sp.items() if k not in ("runs",)}


def run_problems(sizes: dict[str, Sequence[int]], new_tokens: int, repeats: int, warmup: int) -> list[str]:
    """What is wrong with a timing run's settings (every engine of `cboprune bench`), one text each."""
    problems = [f"{name} must be positive integers, got {','.join(map(str, values)) or 'nothing'}"
                for name, values in sizes.items() if not values or any(v < 1 for v in values)]
    if new_tokens < 1:
        problems.append(f"--new-tokens must be >= 1, got {new_tokens}")
    if repeats < 1:
        problems.append(f"--repeats must be >= 1, got {repeats}")
    if warmup < 0:
        problems.append(f"--warmup must be >= 0, got {warmup}")
    return problems


def finish_report(report: dict[str, Any], text: str, models: Sequence[str], targets) -> int:
    """Every engine's last step: the command that made the report, the markdown printed, and
    OUTPUT.json + OUTPUT.md written together when --output was given."""
    argv = sys.argv[1:]
    report["command"] = "cboprune " + shlex.join(argv if argv[:1] == ["bench"] else ["bench", *models])
    print(text)
    if targets:
        write_texts([(targets[0], dumps_strict(report, indent=2) + "\n"), (targets[1], text)])
        print(f"wrote {targets[0]} and {targets[1]}")
    return 0


__all__ = ["BenchSettings", "bench_models", "disk_bytes", "markdown_report",
           "finish_report", "measure_speedup", "memory_run", "model_stats", "run_problems", "speedup_summary", "tensor_bytes", "time_generation"]
