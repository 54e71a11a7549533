"""cboprune: remove whole transformer blocks from LLMs by constrained binary optimization."""

from __future__ import annotations

__version__ = "0.1.0"
