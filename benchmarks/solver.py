"""Benchmark: K-best branch-and-bound vs compiled exhaustive enumeration.

    python benchmarks/solver.py                 # all cases, both matrix kinds (several minutes)
    python benchmarks/solver.py --quick         # N=32 and N=40 only, short anytime run
    python benchmarks/solver.py --cases 64x32 --kinds gradient --json out.json
    python benchmarks/solver.py --cases 126x63 --kinds gradient --anytime-limit 600
    python benchmarks/solver.py --solver-path /work/main ...   # same cases, another checkout's solver

For every case and matrix kind it prints the branch-and-bound wall time (tabu seed + setup +
search, numba already compiled), whether it proved the list exact, the certified gap when it ran
out of time, and the enumeration time with the speed-up ratio.

Enumeration times: the reference enumerator visits states in revolving-door order with a
uniform O(N) cost per state, so it is timed on the first `--enum-states` states and the full
time is extrapolated linearly (C(N, M) / states-per-second); those figures are marked "extrap.".
A calibration case (N=28, M=14, C = 4.0e7) is run in full and compared with its own extrapolation
to show the extrapolation error. With `--full-enum SECONDS`, cases whose extrapolated enumeration
fits in that time are enumerated in full and the two K-best lists are compared state by state.
The machine is shared (2 CPU cores, other jobs running): expect +-20% noise on all timings.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from typing import Any

import numpy as np

def _solver_path(argv: list[str]) -> str:
    """--solver-path DIR (read before the imports): import cboprune from DIR instead of here."""
    for i, a in enumerate(argv):
        if a == "--solver-path" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--solver-path="):
            return a.split("=", 1)[1]
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


sys.path.insert(0, _solver_path(sys.argv))

from cboprune.solvers import enumerate_exhaustive, make_problem, solve  # noqa: E402
from cboprune.solvers.exhaustive import run_enumeration  # noqa: E402
from cboprune.solvers.synthetic import gradient_gram, wishart  # noqa: E402

CASES: dict[str, tuple[int, int, int]] = {
    "32x16": (32, 16, 20),
    "40x12": (40, 12, 10),
    "64x32": (64, 32, 10),
    "128x32": (128, 32, 10),
    # the depth of the largest dense models (issue 20): Llama-3.1-405B has 126 blocks
    "96x48": (96, 48, 20),
    "112x56": (112, 56, 20),
    "126x63": (126, 63, 20),
}
TARGETS = {"32x16": 1.0, "40x12": 5.0, "64x32": 60.0}


def make_matrix(kind: str, n: int, seed: int) -> np.ndarray:
    """(n, n) benchmark matrix: 'gradient' (per-sample-gradient Gram, m=128 or 256) or 'wishart'."""
    m = 128 if n <= 64 else 256
    if kind == "gradient":
        return gradient_gram(n, m, seed)
    if kind == "wishart":
        return wishart(n, m, seed)
    raise ValueError(f"unknown matrix kind {kind!r}")


def enum_throughput(H: np.ndarray, m: int, k: int, n_states: int) -> tuple[float, int, float]:
    """(states per second, states timed, seconds) of the compiled enumeration."""
    p = make_problem(H, m, k)
    n_states = int(min(n_states, p.n_feasible))
    _, visited, dt = run_enumeration(p, k, max_states=n_states)
    return visited / dt, visited, dt


def warm_up() -> None:
    """Compile every kernel before timing (numba caches, but an edited kernel recompiles)."""
    H = wishart(12, 20, 0)
    solve(H, 5, 3, method="exact")
    solve(H, 5, 3, method="tabu")
    enumerate_exhaustive(H, 5, 3)
    from cboprune.solvers.bnb import run_bnb
    try:  # the best-first phase (small cases never reach it inside solve)
        run_bnb(make_problem(H, 5, 3), 3, quick_s=0.0)
    except TypeError:  # an older solver (--solver-path) without that phase
        pass


def run_case(name: str, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    n, m, k = CASES[name]
    H = make_matrix(kind, n, args.seed)
    total = math.comb(n, m)
    anytime = n > 64
    tl = args.anytime_limit if anytime else args.exact_limit
    t0 = time.perf_counter()
    r = solve(H, m, k, method="exact", time_limit=tl)
    t_bnb = time.perf_counter() - t0
    if args.no_enum:
        rate, timed, t_timed = float("nan"), 0, 0.0
    else:
        rate, timed, t_timed = enum_throughput(H, m, k, args.enum_states)
    t_enum = total / rate
    extrap = timed < total
    row: dict[str, Any] = {
        "case": name, "kind": kind, "N": n, "M": m, "K": k, "states": total,
        "bnb_s": t_bnb, "exact": r.exact, "gap": r.info.get("gap"),
        "gap_rel": (r.info.get("gap") or 0.0) / abs(r[-1].score) if r[-1].score else None,
        "lower_bound": r.lower_bound, "E0": r[0].score, "EK": r[-1].score,
        "n_certified": r.info.get("n_certified"), "nodes": r.info["nodes"],
        "enum_s": t_enum, "enum_extrapolated": extrap, "enum_states_timed": timed,
        "enum_timed_s": t_timed, "enum_rate": rate, "speedup": t_enum / t_bnb,
        "target_s": TARGETS.get(name), "time_limit": tl,
        "root_bound": r.info.get("root_bound"), "shift": r.info.get("relaxation_shift"),
        "nodes_best_first": r.info.get("nodes_best_first"), "dives": r.info.get("dives"),
        "load": os.getloadavg()[0],
    }
    if args.no_enum:
        pass
    elif args.full_enum and extrap and t_enum <= args.full_enum:
        ref = enumerate_exhaustive(H, m, k)
        row["enum_s"] = ref.info["time_s"]
        row["enum_extrapolated"] = False
        row["speedup"] = row["enum_s"] / t_bnb
        row["same_as_enumeration"] = [c.removed for c in ref] == [c.removed for c in r]
    elif not extrap:
        ref = enumerate_exhaustive(H, m, k)
        row["same_as_enumeration"] = [c.removed for c in ref] == [c.removed for c in r]
    return row


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Full enumeration of C(28, 14) vs the extrapolation from its first 10% (best of 2 each)."""
    H = make_matrix("gradient", 28, args.seed)
    p = make_problem(H, 14, 10)
    t_full = t_part = np.inf
    for _ in range(2):
        _, visited, dt = run_enumeration(p, 10)
        t_full = min(t_full, dt)
        _, part, dt = run_enumeration(p, 10, max_states=visited // 10)
        t_part = min(t_part, dt)
    pred = t_part * visited / part
    return {"states": visited, "full_s": t_full, "extrapolated_s": pred,
            "rel_error": pred / t_full - 1.0}


def fmt_s(x: float) -> str:
    if x >= 86400:
        return f"{x / 86400:.3g} d"
    if x >= 3600:
        return f"{x / 3600:.3g} h"
    return f"{x:.3g} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=32 and N=40 only, 10 s anytime")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    ap.add_argument("--kinds", nargs="+", choices=["gradient", "wishart"],
                    default=["gradient", "wishart"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anytime-limit", type=float, default=60.0,
                    help="seconds for the N=128 anytime run (default 60)")
    ap.add_argument("--exact-limit", type=float, default=600.0,
                    help="safety time limit of the exact runs (default 600)")
    ap.add_argument("--enum-states", type=int, default=50_000_000,
                    help="states the enumeration is timed on before extrapolating")
    ap.add_argument("--full-enum", type=float, default=0.0,
                    help="enumerate in full when the extrapolated time is below this (seconds)")
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--no-enum", action="store_true",
                    help="skip the enumeration timing (anytime comparisons only)")
    ap.add_argument("--solver-path", default=None,
                    help="import cboprune from this checkout (e.g. /work/main: the baseline)")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    cases = args.cases or (["32x16", "40x12"] if args.quick else list(CASES))
    if args.quick:
        args.anytime_limit = min(args.anytime_limit, 10.0)
        args.enum_states = min(args.enum_states, 10_000_000)
    print(f"# cboprune solver benchmark  python {platform.python_version()}  "
          f"cpus={os.cpu_count()}  load={os.getloadavg()[0]:.2f} (shared machine: timings noisy)"
          f"  solver={os.path.dirname(os.path.dirname(solve.__code__.co_filename))}")
    warm_up()
    out: dict[str, Any] = {"rows": [], "calibration": None}
    if not args.no_calibrate and not args.quick:
        cal = calibrate(args)
        out["calibration"] = cal
        print(f"# enumeration extrapolation check: C(28,14)={cal['states']:.3g} states, full "
              f"{cal['full_s']:.2f} s, extrapolated from first 10% {cal['extrapolated_s']:.2f} s "
              f"({100 * cal['rel_error']:+.1f}%)")
    hdr = (f"{'case':>7} {'kind':>9} {'K':>3} {'states':>8} {'bnb':>8} {'exact':>5} "
           f"{'gap(rel)':>9} {'nodes':>9} {'enumeration':>18} {'speed-up':>9} {'target':>7}")
    print(hdr)
    for name in cases:
        for kind in args.kinds:
            row = run_case(name, kind, args)
            out["rows"].append(row)
            enum = "-" if args.no_enum else (
                fmt_s(row["enum_s"]) + (" extrap." if row["enum_extrapolated"] else " full"))
            gap = "-" if row["exact"] else f"{row['gap_rel']:.1%}"
            tgt = "-" if row["target_s"] is None else (
                ("ok " if row["bnb_s"] <= row["target_s"] and row["exact"] else "MISS ")
                + f"{row['target_s']:g}s")
            same = row.get("same_as_enumeration")
            tag = "" if same is None else ("  [= enumeration]" if same else "  [DIFFERS!]")
            print(f"{name:>7} {kind:>9} {row['K']:>3} {row['states']:8.2g} "
                  f"{row['bnb_s']:7.3g}s {str(row['exact']):>5} {gap:>9} {row['nodes']:9d} "
                  f"{enum:>18} {row['speedup']:8.3g}x {tgt:>7}{tag}  load={row['load']:.1f}",
                  flush=True)
    print("# enumeration: compiled revolving-door enumeration; 'extrap.' = timed on "
          f"{args.enum_states:.2g} states and scaled linearly to C(N, M)")
    print("# bnb: wall time of solve(method='exact') incl. tabu seed and setup; gap(rel) = "
          "(E_K - certified lower bound) / E_K when the time limit stopped it")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
