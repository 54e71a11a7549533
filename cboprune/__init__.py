"""cboprune: remove whole transformer blocks from LLMs by constrained binary optimization."""

from __future__ import annotations

from cboprune.core.lazy import lazy_exports
from cboprune.core.version import __version__

# `import cboprune` stays light (the CLI's start-up): the in-memory API loads torch on first use
__getattr__ = lazy_exports(__name__, {"prune": "cboprune.api"})

__all__ = ["__version__", "prune"]
