"""Training-free repair of a pruned model: a linear stand-in for each removed run of blocks, folded
into the kept weights (see cboprune.repair.linear and docs/repair.md)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {name: "cboprune.repair.linear" for name in
            ("OBJECTIVES", "Run", "check_repairable", "plan_repair", "removed_runs", "repair_linear")}

__all__ = ["OBJECTIVES", "Run", "check_repairable", "plan_repair", "removed_runs", "repair_linear"]


def __getattr__(name: str) -> Any:
    # PEP 562: the names load on first use, so that a parser under this package (`cboprune.repair.cli`)
    # imports without torch (`cboprune --help` start-up)
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cboprune.repair' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
