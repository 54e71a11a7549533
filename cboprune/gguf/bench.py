"""`cboprune bench --engine llama.cpp ORIGINAL.gguf PRUNED.gguf ...`: speed where users run GGUF files.

Per model and prompt length L: prompt processing (one `eval` of L tokens, llama.cpp's batched
forward; tokens/s = L / seconds) and generation (N greedy steps of one token with the KV cache;
tokens/s = N / seconds), as llama.cpp's `llama-bench` reports pp and tg. Every repetition runs
every model, the order reversed each repetition, so that drift on a shared machine hits them
alike; the figures are median (min–max) over repetitions and the speed-up is the median of the
paired ratios original time / pruned time. Sizes are the files' bytes.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cboprune.bench.measure import finish_report, run_problems
from cboprune.core.errors import CBOPruneError
from cboprune.evaluation.results import output_paths
from cboprune.gguf.prune import open_gguf
from cboprune.gguf.runner import last_logits, llama_cpp_module, open_llama
from cboprune.models.loading import DEFAULT_MODEL, default_gguf_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LlamaBenchSettings:
    lengths: tuple[int, ...] = (128, 512)
    new_tokens: int = 32
    repeats: int = 5
    warmup: int = 1
    threads: int | None = None
    seed: int = 0

    def check(self) -> None:
        problems = run_problems({"--lengths": self.lengths}, self.new_tokens, self.repeats, self.warmup)
        if self.threads is not None and self.threads < 1:
            problems.append(f"--threads must be >= 1, got {self.threads}")
        if problems:
            raise CBOPruneError("; ".join(problems))


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _time_one(llm: Any, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prompt seconds, generation seconds) of one run from an empty KV cache."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        llm.eval([int(np.argmax(last_logits(llm)))])
    return t1 - t0, time.perf_counter() - t1


def bench_gguf(paths: Sequence[str | Path], settings: LlamaBenchSettings | None = None) -> dict[str, Any]:
    """Measure every GGUF file (the first is the reference) in llama.cpp on the CPU."""
    settings = settings or LlamaBenchSettings()
    settings.check()
    if len(paths) < 2:
        raise CBOPruneError("bench needs the original GGUF and at least one pruned GGUF")
    sources = [open_gguf(p) for p in paths]  # every file checked before any is timed
    names = []
    for s in sources:
        name = str(s.path)
        names.append(name if name not in names else f"{name}#{len(names)}")
    n_ctx = max(settings.lengths) + settings.new_tokens + 8
    threads = settings.threads or os.cpu_count() or 1
    stack = []
    llms = {}
    load_before = os.getloadavg()
    started = time.time()
    try:
        for name, s in zip(names, sources):
            cm = open_llama(s.path, n_ctx=n_ctx, n_threads=threads, logits_all=False,
                            n_batch=max(settings.lengths))
            llms[name] = cm.__enter__()
            stack.append(cm)
        vocab = min(llm.n_vocab() for llm in llms.values())
        rng = np.random.default_rng(settings.seed)
        prompts = {length: rng.integers(0, vocab, size=length).tolist() for length in settings.lengths}
        times: dict[int, dict[str, list[tuple[float, float]]]] = {n: {m: [] for m in names} for n in settings.lengths}
        for i in range(settings.warmup + settings.repeats):
            order = names if i % 2 == 0 else names[::-1]
            for length in settings.lengths:
                for name in order:
                    t = _time_one(llms[name], prompts[length], settings.new_tokens)
                    if i >= settings.warmup:
                        times[length][name].append(t)
            log.info("llama.cpp bench: %s %d/%d done", "repetition" if i >= settings.warmup else "warm-up",
                     i + 1 - settings.warmup if i >= settings.warmup else i + 1,
                     settings.repeats if i >= settings.warmup else settings.warmup)
    finally:
        for cm in reversed(stack):
            cm.__exit__(None, None, None)
    models = {}
    for name, s in zip(names, sources):
        types: dict[str, int] = {}
        for t in s.reader.tensors:
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        models[name] = {"blocks": s.n_blocks, "file_bytes": s.path.stat().st_size, "tensor_types": types,
                        "removed_blocks": s.values.get("cboprune.removed_blocks")}
    runs = []
    ref = names[0]
    for length in settings.lengths:
        for name in names:
            pp = [p for p, _ in times[length][name]]
            tg = [g for _, g in times[length][name]]
            row: dict[str, Any] = {"model": name, "length": length, "new_tokens": settings.new_tokens,
                                   "prompt_tokens_per_s": _spread([length / p for p in pp]),
                                   "generation_tokens_per_s": _spread([settings.new_tokens / g for g in tg])}
            if name != ref:
                pairs = list(zip(times[length][ref], times[length][name]))
                row["prompt_speedup"] = _spread([r[0] / t[0] for r, t in pairs])
                row["generation_speedup"] = _spread([r[1] / t[1] for r, t in pairs])
            runs.append(row)
    import llama_cpp

    machine = {"engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "threads": threads,
               "cpu_count": os.cpu_count(), "seconds": round(time.time() - started, 1),
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    return {"models": models, "runs": runs, "settings": asdict(settings), "machine": machine}


def _cell(s: dict[str, float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}–{fmt.format(s['max'])})"


def markdown_report(report: dict[str, Any]) -> str:
    lines = ["| model | blocks | file MiB | tensor types |", "|---|---:|---:|---|"]
    for name, m in report["models"].items():
        types = ", ".join(f"{k} × {v}" for k, v in sorted(m["tensor_types"].items()))
        lines.append(f"| {name} | {m['blocks']} | {m['file_bytes'] / 2**20:.1f} | {types} |")
    s, mach = report["settings"], report["machine"]
    lines += ["", (f"**llama.cpp** (llama-cpp-python {mach['llama_cpp_python']}, {mach['threads']} threads, CPU) — "
                   f"median (min–max) of {s['repeats']} repetitions, {s['new_tokens']} generated tokens"), "",
              "| model | prompt L | prompt tok/s | generation tok/s | prompt speed-up | generation speed-up |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        up = [_cell(r[k], "{:.2f}") + "×" if k in r else "1" for k in ("prompt_speedup", "generation_speedup")]
        lines.append(f"| {r['model']} | {r['length']} | {_cell(r['prompt_tokens_per_s'])} "
                     f"| {_cell(r['generation_tokens_per_s'])} | {up[0]} | {up[1]} |")
    lines += ["", (f"{mach['cpu_count']} CPUs, load average {mach['load_average_before'][0]} → "
                   f"{mach['load_average_after'][0]}; {mach['seconds']} s"), ""]
    return "\n".join(lines)


def run_llama_bench(args: Any) -> int:
    """`cboprune bench --engine llama.cpp`: the `bench` command's flags that apply to llama.cpp."""
    not_here = [flag for flag, value in (("--batch-sizes", tuple(args.batch_sizes) != (1, 8)), ("--device", args.device),
                                         ("--no-memory", args.no_memory), ("--dtype", args.dtype != "float32"))
                if value]
    if not_here:
        raise CBOPruneError(f"{', '.join(not_here)}: not used by --engine llama.cpp (one sequence, the files' own "
                            "tensor types, CPU)")
    settings = LlamaBenchSettings(lengths=tuple(args.lengths), new_tokens=args.new_tokens, repeats=args.repeats,
                                  warmup=args.warmup, threads=args.threads, seed=args.seed)
    settings.check()
    paths = [default_gguf_path() if m == DEFAULT_MODEL else Path(m) for m in args.models]
    bad = [str(p) for p in paths if p.suffix != ".gguf"]
    if bad:
        raise CBOPruneError(f"--engine llama.cpp runs GGUF files; not GGUF: {', '.join(bad)} (export a checkpoint "
                            "with `cboprune export DIR -o FILE.gguf`)")
    targets = None
    if args.output:

        targets = output_paths(args.output, overwrite=args.overwrite)
    llama_cpp_module()
    report = bench_gguf(paths, settings)
    return finish_report(report, markdown_report(report), args.models, targets)


__all__ = ["LlamaBenchSettings", "bench_gguf", "markdown_report", "run_llama_bench"]
