"""Training-free repair of a pruned model: a linear stand-in for each removed run of blocks, folded
into the kept weights (see cboprune.repair.linear and docs/repair.md)."""

from __future__ import annotations

from cboprune.core.lazy import lazy_exports

_EXPORTS = {name: "cboprune.repair.linear" for name in
            ("OBJECTIVES", "Run", "check_repairable", "plan_repair", "removed_runs", "repair_linear")}

__all__ = ["OBJECTIVES", "Run", "check_repairable", "plan_repair", "removed_runs", "repair_linear"]

__getattr__ = lazy_exports(__name__, _EXPORTS)
