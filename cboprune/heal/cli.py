"""`cboprune heal`: arguments and handler (registered by cboprune.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cboprune.errors import CBOPruneError
from cboprune.heal import recipe
from cboprune.heal.recipe import MIXED_PRECISION, OPTIMIZERS, REPORT_TO, SAVE_DTYPES


def add_heal_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("student", help="pruned checkpoint directory (written by `cboprune prune` or `run`)")
    p.add_argument("--teacher", help="the original model (default: source_model from the student's removal.json)")
    p.add_argument("--data", required=True, help="distillation data: .jsonl/.json/.txt (chat records use the "
                                                 "chat template)")
    p.add_argument("--output-dir", required=True, help="where the healed checkpoint goes")
    p.add_argument("--steps", type=int, dest="max_steps", help="optimizer steps (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, dest="learning_rate", default=recipe.LEARNING_RATE)
    p.add_argument("--micro-batch-size", type=int, default=recipe.MICRO_BATCH_SIZE)
    p.add_argument("--global-batch-size", type=int, default=recipe.GLOBAL_BATCH_SIZE, help="gradient accumulation reaches this")
    p.add_argument("--seq-len", type=int, default=recipe.SEQ_LEN)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--kd-weight", type=float, default=1.0, help="1: pure KL distillation; <1 mixes in cross-entropy")
    p.add_argument("--loss-on", choices=["all", "responses"], default="all")
    p.add_argument("--optim", dest="optimizer", choices=OPTIMIZERS, help="adamw (default) or adamw8bit "
                                                                         "(bitsandbytes 8-bit moments, ~4x less state)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) and merge them on save")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--fsdp", action="store_true", help="shard the student across the launched processes (FSDP2; "
                                                      "also on under `accelerate launch` with an FSDP config)")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps (for --resume)")
    p.add_argument("--max-minutes", type=float, help="training time budget; stops early and saves when spent")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="records held out for the before/after loss")
    p.add_argument("--max-samples", type=int, help="use at most this many training samples")
    p.add_argument("--teacher-4bit", action=argparse.BooleanOptionalAction, default=None,
                   help="NF4 teacher (CUDA + bitsandbytes; default: on when CUDA is present)")
    p.add_argument("--teacher-cache", help="directory of cached teacher top-k outputs: computed once per sample, "
                                           "reused by every student healed on the same data")
    p.add_argument("--teacher-top-k", type=int, help="tokens kept per position in --teacher-cache (default 64)")
    p.add_argument("--loss-chunk-tokens", type=int, help="tokens per chunk of the distillation loss "
                                                         "(default: about 16M logits per chunk; 0: plain formula)")
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, help="default auto: bf16 on CUDA, none on CPU")
    p.add_argument("--save-dtype", choices=SAVE_DTYPES, help="healed checkpoint dtype (default: the student's)")
    p.add_argument("--eval-every", type=int, help="held-out loss every N steps (into healing.json and the curve)")
    p.add_argument("--report-to", choices=REPORT_TO, help="also log to TensorBoard or W&B (offline by default)")
    p.add_argument("--logging-dir", help="tracker log directory (default: <output-dir>.runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def teacher_from_removal(student: str) -> str:
    removal = Path(student) / "removal.json"
    if removal.is_file():
        from cboprune.outputs import read_json_object

        source = read_json_object(removal, "restore it, or pass --teacher").get("source_model")
        if source and isinstance(source, str):
            return source
    raise CBOPruneError(f"{student} has no removal.json naming its source model: pass --teacher")


def run_heal_command(args: argparse.Namespace) -> int:
    from cboprune.heal import HealConfig, heal

    if not Path(args.student).is_dir():
        raise CBOPruneError(f"student checkpoint not found: {args.student}")
    names = set(HealConfig.__dataclass_fields__) - {"student", "teacher"}
    cfg = HealConfig(student=args.student, teacher=args.teacher or teacher_from_removal(args.student),
                     **{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})
    report = heal(cfg, progress=not args.quiet)
    before, after = report["heldout_loss_before"], report["heldout_loss_after"]
    if before:
        print(f"held-out loss: teacher {before['teacher']:.4f}, student {before['student']:.4f} -> "
              f"{after['student']:.4f} (gap closed: {report['gap_closed']:.1%})"
              if report["gap_closed"] is not None else f"held-out loss {before['student']:.4f} -> {after['student']:.4f}")
    if cfg.teacher_cache:
        print(f"teacher cache {cfg.teacher_cache}: {report['teacher_samples_computed']} samples computed this run")
    print(f"healed checkpoint: {cfg.output_dir} ({report['steps']} steps, {report['seconds']} s)")
    return 0
