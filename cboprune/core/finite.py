"""The one guard for every number we report: a NaN or an infinity is never shown as a result.

Two outcomes, chosen by the caller:
- `require_finite`: the value must be a number (a loss of the original model, a bench timing);
  anything else is a defect and becomes one line that names what, of which model, at which step.
- `metric_cell` / `metric_key`: a configuration may legitimately diverge (a catastrophic removal
  whose loss overflows, a heal that blows up): the cell reads "diverged", never "nan", and the
  configuration sorts after every measured one. A value that was not measured (None) reads "—".

Torch-free, so tables, the CLI and the JSON writers can all use it.
"""

from __future__ import annotations

import math
from typing import Any

from cboprune.core.errors import CBOPruneError

DIVERGED = "diverged"
NOT_MEASURED = "—"


def is_number(value: Any) -> bool:
    """A finite real number (bools and None are not)."""
    if value is None or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def diverged(value: Any) -> bool:
    """Measured, but not a finite number (NaN, ±inf, or the DIVERGED marker itself)."""
    return value is not None and (value == DIVERGED or not is_number(value))


def require_finite(value: Any, what: str, model: str, step: str | None = None) -> float:
    """`value` as a float, or a one-line error naming the metric, the model and the step."""
    if is_number(value):
        return float(value)
    at = f" at {step}" if step else ""
    raise CBOPruneError(f"{what} of {model}{at} is {value}, not a number: the model or its inputs are broken "
                        "(check its dtype and weights, e.g. with `cboprune eval`)")


def metric_cell(value: Any, fmt: str = ".4f") -> str:
    """A table cell: the number, "diverged" for NaN/inf, "—" when not measured."""
    if value is None:
        return NOT_MEASURED
    if diverged(value):
        return DIVERGED
    return format(float(value), fmt)


def metric_key(value: Any) -> float:
    """A sort key for lower-is-better metrics: diverged and unmeasured values sort last."""
    return float(value) if is_number(value) else math.inf


__all__ = ["DIVERGED", "NOT_MEASURED", "diverged", "is_number", "metric_cell", "metric_key",
           "require_finite"]
