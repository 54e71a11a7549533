"""Shared-prefix configuration losses vs the plain evaluation, same run: speed-up and agreement.

    python benchmarks/prefix_reuse.py --n-samples 8 --seq-len 128 --out prefix_reuse.json

The configurations are the measured energy's 1 + N + N(N-1)/2 (466 for the default model's N = 30):
the full model, every single removal and every pair. Both evaluations see the same calibration
samples (alpaca_en_demo under ../shared/data by default) on the same in-memory model; the plain one
stacks 4 x batch-size rows per forward pass, the shared-prefix one runs the trie of
`cboprune.models.shared_prefix`. Printed: wall and CPU seconds of both, their ratio, the predicted ratio
of decoder-layer work, and the largest difference between the two sets of NLL values. Exit status 1
when the values differ by more than 1e-6 or, with --min-speedup, the ratio is lower.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cboprune.data import load_calibration
from cboprune.models.masked import configurations_nll, n_blocks
from cboprune.models import load_model
from cboprune.models.shared_prefix import layer_cost

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "calib" / "alpaca_en_demo.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--min-speedup", type=float, default=None)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype="float32")
    calib = load_calibration(args.data, loaded.tokenizer, n_samples=args.n_samples, seq_len=args.seq_len)
    n = n_blocks(loaded.model)
    configs = [()] + [(i,) for i in range(n)] + list(itertools.combinations(range(n), 2))
    shared_layers, plain_layers = layer_cost(configs, n)
    timings = {}
    values = {}
    for name, reuse in (("plain", False), ("shared", True)):
        t0, c0 = time.perf_counter(), time.process_time()
        values[name] = configurations_nll(loaded.model, calib, configs, batch_size=args.batch_size,
                                          prefix_reuse=reuse)
        timings[name] = (time.perf_counter() - t0, time.process_time() - c0)
    diff = float(np.abs(values["shared"] - values["plain"]).max())
    result = {"model": args.model, "n_blocks": n, "configurations": len(configs), "n_samples": calib.n_samples,
              "n_tokens": calib.n_tokens, "threads": torch.get_num_threads(),
              "plain_s": round(timings["plain"][0], 2), "shared_s": round(timings["shared"][0], 2),
              "plain_cpu_s": round(timings["plain"][1], 2), "shared_cpu_s": round(timings["shared"][1], 2),
              "speedup": round(timings["plain"][0] / timings["shared"][0], 3),
              "cpu_speedup": round(timings["plain"][1] / timings["shared"][1], 3),
              "predicted_layer_ratio": round(plain_layers / shared_layers, 3), "max_abs_nll_diff": diff}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    failed = diff > 1e-6 or (args.min_speedup is not None and result["speedup"] < args.min_speedup)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
