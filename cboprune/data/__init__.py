"""Calibration data: files, hub datasets, chat templates, packing, model-generated prompts."""

from __future__ import annotations

from cboprune.data.calibration import CalibrationSet, GenerationSettings, load_calibration

__all__ = ["CalibrationSet", "GenerationSettings", "load_calibration"]
