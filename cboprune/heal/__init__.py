"""Healing: knowledge-distillation retraining of pruned checkpoints (full or LoRA), resumable.

The names below load on first use (PEP 562): `cboprune.heal.recipe` is part of the configuration
layer and must import without torch, which the trainer needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"TeacherCache": "cache", "DistillationLoss": "loss", "SparseTeacher": "loss", "HEALING_FILE": "trainer",
            "HealConfig": "trainer", "heal": "trainer", "heldout_loss": "trainer"}

__all__ = ["HEALING_FILE", "DistillationLoss", "HealConfig", "SparseTeacher", "TeacherCache", "heal", "heldout_loss"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cboprune.heal' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cboprune.heal.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups (and monkeypatching) see a plain attribute
    return value
