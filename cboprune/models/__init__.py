"""Model loading, block discovery (one architecture table) and surgery."""

from __future__ import annotations

from cboprune.models.loading import DEFAULT_MODEL, LoadedModel, load_model

__all__ = ["DEFAULT_MODEL", "LoadedModel", "load_model"]
