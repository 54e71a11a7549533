"""Start-up: the solvers' compiled kernels live under cboprune's cache directory (not next to the
installed package, which may be read-only), and a second process reuses them instead of compiling.
Timings are a benchmark (benchmarks/startup.py), not a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = """
import json, sys
import numpy as np
from cboprune.solvers import solve
from cboprune.solvers import _kernels
rng = np.random.default_rng(0)
A = rng.normal(size=(40, 14))
ranking = solve(A.T @ A / 40, 5, k=4)
stats = [getattr(f, "stats", None) for f in vars(_kernels).values() if hasattr(f, "stats")]
print(json.dumps({"removed": [list(c.removed) for c in ranking.candidates],
                  "hits": sum(sum(s.cache_hits.values()) for s in stats if s),
                  "misses": sum(sum(s.cache_misses.values()) for s in stats if s)}))
"""


def _solve_in_a_new_process(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(CBOPRUNE_CACHE=str(cache), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run([sys.executable, "-c", WORKER], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_reuses_the_compiled_kernels_from_the_cboprune_cache(tmp_path):
    first = _solve_in_a_new_process(tmp_path / "cache")
    index = list((tmp_path / "cache" / "numba").rglob("*.nbi"))
    assert index, "numba wrote no cache index under CBOPRUNE_CACHE/numba"
    assert first["misses"] > 0  # compiled here
    second = _solve_in_a_new_process(tmp_path / "cache")
    assert second["removed"] == first["removed"]
    assert second["hits"] > 0 and second["misses"] == 0, second  # loaded, nothing compiled again
