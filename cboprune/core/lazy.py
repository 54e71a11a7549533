"""Package names that load on first use (PEP 562): `cboprune.heal`, `cboprune.evaluation` and
`cboprune.repair` hold parsers that `cboprune --help` imports, so their packages must import without
torch; their library names (`heal`, `evaluate`, `repair_linear`, ...) load when first used.

    __getattr__ = lazy_exports(__name__, {"evaluate": "cboprune.evaluation.runner", ...})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `exports[name]` (a module path) on first use and keeps the
    value as a plain attribute of `package` (so later lookups, and monkeypatching, see it)."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["lazy_exports"]
