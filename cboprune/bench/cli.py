"""`cboprune bench`: arguments and handler (registered by cboprune.cli). The parser imports nothing
heavy (`cboprune --help` start-up); the handler loads the measurements of `cboprune.bench.measure`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from cboprune.core.config import Config
from cboprune.core.errors import CBOPruneError
from cboprune.core.options import build, option, shared


@dataclass(kw_only=True)  # options in the order --help shows them, required or not
class BenchOptions:
    """The settings of `cboprune bench` (flags and YAML keys are generated from these declarations)."""
    models: list[str] = option(help="the original ('default', a checkpoint directory, a .gguf file or a hub id), "
                                    "then one or more pruned checkpoints (--engine llama.cpp: GGUF files)",
                               kind="strs", positional=True, nargs="+", metavar="MODEL")
    engine: str = option("torch", "torch (default: transformers in PyTorch) or llama.cpp (GGUF files as they are, "
                                  "through llama-cpp-python; docs/gguf.md)", "measurement",
                         choices=("torch", "llama.cpp"))
    batch_sizes: list[int] = option(None, "comma-separated (default: 1,8)", "measurement", kind="ints",
                                    factory=lambda: [1, 8])
    lengths: list[int] = option(None, "prompt lengths in tokens (default: 128,512)", "measurement", kind="ints",
                                factory=lambda: [128, 512])
    new_tokens: int = option(32, "decode steps per run (default: 32)", "measurement", kind="int", minimum=1)
    repeats: int = option(5, "timed repetitions per shape (default: 5)", "measurement", kind="int", minimum=1)
    warmup: int = option(1, "untimed repetitions first (default: 1)", "measurement", kind="int", minimum=0)
    device: str | None = option(None, "comma-separated, e.g. cpu,cuda (default: cpu, and cuda when present)",
                                "model")
    dtype: str = shared(Config, "dtype", help="every model runs in this dtype (default: float32)")
    threads: int | None = option(None, "torch CPU threads (default: torch's)", "measurement", kind="int", minimum=1)
    no_memory: bool = option(False, "skip the memory pass (KV cache, CUDA peak)", "measurement", kind="flag")
    seed: int = shared(Config, "seed")
    output: str | None = option(None, "write OUTPUT.json and OUTPUT.md", "output", aliases=("-o",))
    overwrite: bool = option(False, "replace existing OUTPUT.json / OUTPUT.md", "output", kind="flag")


def run_bench_command(namespace: argparse.Namespace) -> int:
    """Run `cboprune bench`: load the models, measure, print the markdown, write the files."""
    args = build(BenchOptions, namespace, "bench")
    import torch

    from cboprune.bench.measure import (
        BenchSettings,
        bench_models,
        default_devices,
        disk_bytes,
        finish_report,
        markdown_report,
    )
    from cboprune.evaluation.results import output_paths
    from cboprune.models.loading import default_gguf_path, load_model, resolve_dtype

    if len(args.models) < 2:
        raise CBOPruneError("bench needs the original model and at least one pruned checkpoint: "
                            "cboprune bench ORIGINAL PRUNED [PRUNED ...]")
    if args.engine == "llama.cpp":
        from cboprune.gguf.bench import run_llama_bench

        return run_llama_bench(args)
    devices = tuple(d for d in (args.device or ",".join(default_devices())).replace(" ", "").split(",") if d)
    settings = BenchSettings(batch_sizes=tuple(args.batch_sizes), lengths=tuple(args.lengths), new_tokens=args.new_tokens,
                             repeats=args.repeats, warmup=args.warmup, devices=devices, seed=args.seed,
                             memory=not args.no_memory)
    settings.check()
    for dev in devices:
        if dev.startswith("cuda") and not torch.cuda.is_available():
            raise CBOPruneError(f"--device {dev}: CUDA is not available here; use --device cpu")
        if not dev.startswith(("cpu", "cuda")):
            raise CBOPruneError(f"--device {dev!r}: use cpu, cuda or cuda:N")
    resolve_dtype(args.dtype)
    targets = output_paths(args.output, overwrite=args.overwrite) if args.output else None
    if args.threads:
        torch.set_num_threads(args.threads)
    models, disk = {}, {}
    for spec in args.models:
        name = spec if spec not in models else f"{spec}#{len(models)}"
        loaded = load_model(spec, dtype=args.dtype, device="cpu", tokenizer=False)
        models[name] = loaded.model
        gguf = default_gguf_path() if spec == "default" else Path(spec) if spec.endswith(".gguf") else None
        disk[name] = disk_bytes(gguf or loaded.checkpoint_dir)
    report = bench_models(models, settings, disk=disk)
    return finish_report(report, markdown_report(report), args.models, targets)
