"""cboprune: remove whole transformer blocks from LLMs by constrained binary optimization."""

from __future__ import annotations

from cboprune.version import __version__


def __getattr__(name: str):
    # `import cboprune` stays light (the CLI's start-up): the in-memory API loads torch on first use
    if name == "prune":
        from cboprune.api import prune

        return prune
    raise AttributeError(f"module 'cboprune' has no attribute {name!r}")


__all__ = ["__version__", "prune"]
