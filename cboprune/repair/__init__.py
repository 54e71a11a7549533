"""Training-free repair of a pruned model: a linear stand-in for each removed run of blocks, folded
into the kept weights (see cboprune.repair.linear and docs/repair.md)."""

from __future__ import annotations

from cboprune.repair.linear import OBJECTIVES, Run, check_repairable, plan_repair, removed_runs, repair_linear

__all__ = ["OBJECTIVES", "Run", "check_repairable", "plan_repair", "removed_runs", "repair_linear"]
