"""`cboprune bench`: arguments and handler (registered by cboprune.cli). The parser imports nothing
heavy (`cboprune --help` start-up); the handler loads the measurements of `cboprune.bench`."""

from __future__ import annotations

import argparse
from pathlib import Path

from cboprune.config import _int_list
from cboprune.errors import CBOPruneError


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(_int_list(text))


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `bench` subcommand's arguments on `parser`."""
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="the original ('default', a checkpoint directory, a .gguf file or a hub id), "
                             "then one or more pruned checkpoints (--engine llama.cpp: GGUF files)")
    parser.add_argument("--engine", default="torch", choices=("torch", "llama.cpp"),
                        help="torch (default: transformers in PyTorch) or llama.cpp (GGUF files as they are, "
                             "through llama-cpp-python; docs/gguf.md)")
    parser.add_argument("--batch-sizes", type=_int_tuple, default=(1, 8), help="comma-separated (default: 1,8)")
    parser.add_argument("--lengths", type=_int_tuple, default=(128, 512), help="prompt lengths in tokens (default: 128,512)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per run (default: 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per shape (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default: 1)")
    parser.add_argument("--device", default=None, help="comma-separated, e.g. cpu,cuda (default: cpu, and cuda when present)")
    parser.add_argument("--dtype", default="float32", help="every model runs in this dtype (default: float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory pass (KV cache, CUDA peak)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", "-o", default=None, help="write OUTPUT.json and OUTPUT.md")
    parser.add_argument("--overwrite", action="store_true", help="replace existing OUTPUT.json / OUTPUT.md")


def run_bench_command(args: argparse.Namespace) -> int:
    """Run `cboprune bench`: load the models, measure, print the markdown, write the files."""
    import torch

    from cboprune.bench import (
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
    settings = BenchSettings(batch_sizes=args.batch_sizes, lengths=args.lengths, new_tokens=args.new_tokens,
                             repeats=args.repeats, warmup=args.warmup, devices=devices, seed=args.seed,
                             memory=not args.no_memory)
    settings.check()
    if args.threads is not None and args.threads < 1:
        raise CBOPruneError(f"--threads must be >= 1, got {args.threads}")
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
        loaded = load_model(spec, dtype=args.dtype, device="cpu")
        models[name] = loaded.model
        gguf = default_gguf_path() if spec == "default" else Path(spec) if spec.endswith(".gguf") else None
        disk[name] = disk_bytes(gguf or loaded.checkpoint_dir)
    report = bench_models(models, settings, disk=disk)
    return finish_report(report, markdown_report(report), args.models, targets)
