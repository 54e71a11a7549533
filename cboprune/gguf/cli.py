"""The GGUF front ends: `cboprune export` and the GGUF route of `cboprune prune --output FILE.gguf`."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

from cboprune.core.errors import CBOPruneError
from cboprune.gguf import OUTTYPES
from cboprune.core.options import build, option


@dataclass(kw_only=True)  # options in the order --help shows them, required or not
class ExportOptions:
    """The settings of `cboprune export` (flags and YAML keys are generated from these declarations)."""
    checkpoint: str = option(help="a Hugging Face checkpoint directory (pruned, healed, or any)", positional=True)
    output: str = option(help="the GGUF file to write", section="output", metavar="FILE.gguf", aliases=("-o",))
    outtype: str = option("q8_0", "tensor type (default q8_0; 1-D tensors stay f32)", "output", choices=OUTTYPES)
    tokenizer_gguf: str | None = option(None, "copy the tokenizer from this GGUF (default: the source model named "
                                              "in the checkpoint's removal.json when it is a GGUF, e.g. 'default'; "
                                              "else read from tokenizer.json)", "output", metavar="FILE.gguf")
    overwrite: bool = option(False, "replace an existing output file", "output", kind="flag")


def run_export_command(namespace: argparse.Namespace) -> int:
    from cboprune.gguf.export import export_gguf

    args = build(ExportOptions, namespace, "export")
    _check_gguf_name(args.output)
    t0 = time.perf_counter()
    out = export_gguf(args.checkpoint, args.output, outtype=args.outtype, tokenizer_gguf=args.tokenizer_gguf,
                      overwrite=args.overwrite)
    print(f"exported {args.checkpoint} -> {out} ({args.outtype}, {out.stat().st_size / 2**20:.1f} MiB, "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def _check_gguf_name(path: str) -> None:
    if not str(path).endswith(".gguf"):
        raise CBOPruneError(f"--output {path}: a GGUF file name ends with .gguf")


def prune_to_gguf(args: argparse.Namespace) -> int:
    """`cboprune prune --model X.gguf (--blocks ... | --hessian H --remove M [--rank R]) --output Y.gguf`:
    the kept blocks' quantized tensors copied bit for bit (no model is loaded into torch)."""
    from cboprune.gguf.prune import open_gguf, plan_prune, write_gguf
    from cboprune.models.loading import DEFAULT_MODEL, default_gguf_path
    from cboprune.core.outputs import check_output_file

    if args.output is None:
        raise CBOPruneError("--blocks-from writes a GGUF: pass --output FILE.gguf (and a GGUF --model)")
    _check_gguf_name(args.output)
    if sum(x is not None for x in (args.blocks, args.hessian, args.blocks_from)) != 1:
        raise CBOPruneError("pass one of --blocks 3,7,12, --hessian FILE --remove M [--rank R], or --blocks-from "
                            "CHECKPOINT")
    if args.output_dir is not None:
        raise CBOPruneError("pass --output FILE.gguf (a GGUF) or --output-dir DIR (a checkpoint), not both")
    for flag in ("repair", "speedup", "save_dtype"):
        if getattr(args, flag, None):
            raise CBOPruneError(f"--{flag.replace('_', '-')} needs the checkpoint route (--output-dir): a GGUF "
                                "output copies the source's tensors as they are")
    model = args.model or DEFAULT_MODEL
    source_path = default_gguf_path() if model == DEFAULT_MODEL else Path(model).expanduser()
    if source_path.suffix != ".gguf":
        raise CBOPruneError(f"--output {args.output} writes a GGUF from a GGUF --model, but {model} is not one: "
                            f"prune to a checkpoint (--output-dir DIR), then `cboprune export DIR -o {args.output}`")
    out = check_output_file(args.output, args.overwrite or False)
    if out.exists() and source_path.exists() and out.resolve() == source_path.resolve():
        raise CBOPruneError(f"--output {out} is the source GGUF: write the pruned model to another path")
    t0 = time.perf_counter()
    source = open_gguf(source_path)
    method, energy, rank = "manual", None, None
    if args.hessian is not None:
        if args.remove is None or len(args.remove) != 1:
            raise CBOPruneError("with --hessian pass one --remove M (and optionally --rank R)")
        from cboprune.selection.hessian import load_hessian
        from cboprune.selection.energy import solve_rankings

        hessian = load_hessian(args.hessian)
        if hessian.n_blocks != source.n_blocks:
            raise CBOPruneError(f"the Hessian has {hessian.n_blocks} blocks but {source.path} has {source.n_blocks}: "
                                "pass the --model it was computed on")
        ranking = solve_rankings(hessian, args.remove, args.rank + 1, keep=list(args.keep or []))[0]
        if args.rank >= len(ranking.candidates):
            raise CBOPruneError(f"rank {args.rank} does not exist: only {len(ranking.candidates)} states")
        cand = ranking.candidates[args.rank]
        removed, method, rank = list(cand.removed), ranking.method, args.rank
        energy = cand.score if math.isfinite(cand.score) else None
    elif args.blocks_from is not None:
        removed, method, energy, rank = _removal_of(Path(args.blocks_from), source.n_blocks)
    else:
        removed = list(args.blocks)
    plan = plan_prune(source, removed, {"method": method, "energy": energy, "state_rank": rank})
    write_gguf(plan, out, overwrite=args.overwrite or False)
    before, after = source.path.stat().st_size, out.stat().st_size
    print(f"removed blocks {plan.removed} of {source.n_blocks} ({source.arch}) -> {out}: {after / 2**20:.1f} MiB "
          f"({100 * (1 - after / before):.1f}% smaller than {before / 2**20:.1f} MiB), "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _removal_of(checkpoint: Path, n_blocks: int) -> tuple[list[int], str, float | None, int | None]:
    """(removed blocks, method, energy, state rank) from a pruned checkpoint's removal.json."""
    from cboprune.core.outputs import read_json_object

    path = checkpoint / "removal.json" if checkpoint.is_dir() else checkpoint
    if not path.is_file():
        raise CBOPruneError(f"--blocks-from {checkpoint}: no removal.json there; pass a checkpoint written by "
                            "cboprune prune / run / heal")
    info = read_json_object(path, "pass a checkpoint written by cboprune prune / run / heal")
    removed = info.get("removed")
    if not isinstance(removed, list) or not removed or not all(isinstance(i, int) for i in removed):
        raise CBOPruneError(f"{path} names no removed blocks (a 'removed' list of block indices)")
    original = info.get("n_blocks_original")
    if isinstance(original, int) and original != n_blocks:
        raise CBOPruneError(f"{path} removed blocks of a {original}-block model, but the GGUF has {n_blocks} blocks: "
                            "pass the --model it was pruned from")
    energy = info.get("energy")
    energy = float(energy) if isinstance(energy, (int, float)) and math.isfinite(energy) else None
    rank = info.get("state_rank") if isinstance(info.get("state_rank"), int) else None
    method = str(info.get("method") or "manual")
    return removed, method, energy, rank


__all__ = ["prune_to_gguf", "run_export_command"]
