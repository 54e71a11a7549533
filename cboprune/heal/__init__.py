"""Healing: knowledge-distillation retraining of pruned checkpoints (full or LoRA), resumable."""

from __future__ import annotations

from cboprune.heal.cache import TeacherCache
from cboprune.heal.loss import DistillationLoss, SparseTeacher
from cboprune.heal.trainer import HEALING_FILE, HealConfig, heal, heldout_loss

__all__ = ["HEALING_FILE", "DistillationLoss", "HealConfig", "SparseTeacher", "TeacherCache", "heal", "heldout_loss"]
