"""Benchmark: start-up. `cboprune --help` and `cboprune methods` wall time, and the first `solve` at
N = 32 in a second process with the package directory read-only (the compiled solver kernels must
come from the cboprune cache, not be compiled again).

    python benchmarks/startup.py            # 5 repetitions each; prints medians and spread

Each figure is the median of --repeats fresh processes (min-max in brackets), measured in one run on
this machine; the docs record them with the core count and what else ran.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOLVE = """
import time
t0 = time.perf_counter()
import numpy as np
from cboprune.solvers import solve
rng = np.random.default_rng(0)
A = rng.normal(size=(64, 32))
solve(A.T @ A / 64, 8, k=10)
print(time.perf_counter() - t0)
"""


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s [{min(values):.2f}-{max(values):.2f}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cli = [sys.executable, "-m", "cboprune.cli"]
    env = dict(os.environ)
    results = {"--help": [_timed([*cli, "--help"], env) for _ in range(args.repeats)],
               "methods": [_timed([*cli, "methods"], env) for _ in range(args.repeats)]}
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "site" / "cboprune"
        shutil.copytree(REPO / "cboprune", package, ignore=shutil.ignore_patterns("__pycache__"))
        for path in [package, *package.rglob("*")]:  # a read-only install
            path.chmod(0o555 if path.is_dir() else 0o444)
        solve_env = {**env, "PYTHONPATH": str(package.parent), "CBOPRUNE_CACHE": str(Path(tmp) / "cache")}
        solve_env.pop("NUMBA_CACHE_DIR", None)
        first = float(subprocess.run([sys.executable, "-c", SOLVE], env=solve_env, check=True, capture_output=True,
                                     text=True).stdout.split()[-1])
        results["first solve N=32, second process"] = [
            float(subprocess.run([sys.executable, "-c", SOLVE], env=solve_env, check=True, capture_output=True,
                                 text=True).stdout.split()[-1]) for _ in range(args.repeats)]
        for path in [package, *package.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    print(f"first solve N=32 in the first process (compiles the kernels): {first:.2f} s")
    for name, values in results.items():
        print(f"{name}: {_summary(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
