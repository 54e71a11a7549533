"""Effect of the cached top-k teacher on healing: the same short run with the full teacher and with
cached top-k outputs, on the default model (SmolLM2-135M-Instruct) with some blocks removed.

    PYTHONPATH=. python benchmarks/healing_cache.py --remove 20 21 22 23 24 25 --steps 30 --top-k 64 16

The figures in docs/healing.md: `--steps 10 --seq-len 128 --top-k 64 --heldout 16` (a loaded machine).

Prints one JSON line per run (held-out cross-entropy before/after, gap closed, teacher samples
computed, seconds) as it goes; the data are the first records of alpaca_en_demo.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "calib" / "alpaca_en_demo.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--remove", type=int, nargs="+", default=[20, 21, 22, 23, 24, 25])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--global-batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=192)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--top-k", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--heldout", type=int, default=32, help="held-out samples")
    args = ap.parse_args()

    from cboprune.heal import HealConfig, heal
    from cboprune.models import load_model
    from cboprune.models.surgery import remove_blocks, save_pruned

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model("default")
        student = Path(tmp) / "student"
        save_pruned(remove_blocks(loaded.model, args.remove), loaded.tokenizer, student,
                    {"removed": args.remove, "source_model": "default"})
        del loaded
        base = dict(student=str(student), teacher="default", data=args.data, seq_len=args.seq_len,
                    micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                    max_steps=args.steps, learning_rate=args.lr, save_every=10_000, heldout_samples=args.heldout,
                    seed=0)
        runs = [("full teacher", {})] + [(f"cached top-{k}", {"teacher_cache": f"{tmp}/cache-{k}",
                                                               "teacher_top_k": k}) for k in args.top_k]
        for name, extra in runs:
            start = time.perf_counter()
            report = heal(HealConfig(output_dir=f"{tmp}/{name.replace(' ', '-')}", **base, **extra), progress=False)
            before, after = report["heldout_loss_before"], report["heldout_loss_after"]
            print(json.dumps({"run": name, "removed": args.remove, "steps": report["steps"],
                              "tokens_per_step": args.global_batch_size * args.seq_len,
                              "heldout_ce_teacher": before["teacher"], "heldout_ce_before": before["student"],
                              "heldout_ce_after": after["student"], "gap_closed": report["gap_closed"],
                              "train_loss_first_last": report["train_loss_first_last"],
                              "teacher_samples_computed": report["teacher_samples_computed"],
                              "seconds_total": round(time.perf_counter() - start, 1),
                              "seconds_training": report["seconds"]}), flush=True)


if __name__ == "__main__":
    main()
