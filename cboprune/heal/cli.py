"""`cboprune heal`: arguments and handler (registered by cboprune.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cboprune.core.errors import CBOPruneError
from cboprune.heal.recipe import HealConfig
from cboprune.core.options import build


def teacher_from_removal(student: str) -> str:
    removal = Path(student) / "removal.json"
    if removal.is_file():
        from cboprune.core.outputs import read_json_object

        source = read_json_object(removal, "restore it, or pass --teacher").get("source_model")
        if source and isinstance(source, str):
            return source
    raise CBOPruneError(f"{student} has no removal.json naming its source model: pass --teacher")


def run_heal_command(args: argparse.Namespace) -> int:
    from cboprune.heal import heal

    if not Path(args.student).is_dir():
        raise CBOPruneError(f"student checkpoint not found: {args.student}")
    cfg = build(HealConfig, args, "heal", computed={"teacher": lambda: teacher_from_removal(args.student)})
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
