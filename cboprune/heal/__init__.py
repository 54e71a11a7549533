"""Healing: knowledge-distillation retraining of pruned checkpoints (full or LoRA), resumable.

The names below load on first use (PEP 562): `cboprune.heal.recipe` is part of the configuration
layer and must import without torch, which the trainer needs.
"""

from __future__ import annotations

from cboprune.core.lazy import lazy_exports

_EXPORTS = {name: f"cboprune.heal.{module}" for name, module in (
    ("TeacherCache", "cache"), ("DistillationLoss", "loss"), ("SparseTeacher", "loss"), ("HEALING_FILE", "trainer"),
    ("HealConfig", "trainer"), ("heal", "trainer"), ("heldout_loss", "trainer"))}

__all__ = ["HEALING_FILE", "DistillationLoss", "HealConfig", "SparseTeacher", "TeacherCache", "heal", "heldout_loss"]

__getattr__ = lazy_exports(__name__, _EXPORTS)
