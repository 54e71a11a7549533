"""The option choices that configuration validates and the layers above read: Hessian variants,
autocast names, merge rules, solvers, repair objectives, and the `--data` grammar (a file, the
built-in prompts, or a weighted mix). Pure data and parsing, without torch, so that a bad value is
one line before anything loads, and so that the solvers, the Hessian pass and the data loaders need
nothing of `Config` to know them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cboprune.core.errors import CBOPruneError

HESSIAN_VARIANTS = {
    "fisher": "empirical Fisher AᵀA/m (the paper's H)",
    "centered": "gradient covariance AᵀA/m - ḡḡᵀ",
    "exact": "exact Hessian of the mean loss w.r.t. the gates at alpha = 1 (N Hessian-vector products)",
}
AUTOCAST_NAMES = ("bfloat16", "bf16", "float16", "fp16")
MERGE_RULES = ("difference", "reference-code")
DEFAULT_MERGE_RULE = "difference"
SOLVER_METHODS = ("auto", "exact", "enumerate", "tabu", "tempering")
REPAIR_OBJECTIVES = {
    "lstsq": "ridge least squares on the hidden state leaving the run",
    "cosine": "token-normalized least squares (each token weighted by 1/||target||^2), a closed-form "
              "surrogate of the cosine distance",
}
REPAIR_RIDGE = 1e-4


# ----------------------------------------------------------------------------- the --data grammar
# A weighted mix of calibration sources, `a.json:0.7,b.txt:0.3` (cboprune.data.mix builds it):
# parsed here, without torch, so that a bad mix is one line before anything loads.

GENERATED_NAMES = ("generated", "builtin")


@dataclass(frozen=True)
class MixSource:
    spec: str  # a file path or "generated"
    weight: float  # normalized: the weights of a mix sum to 1

    @property
    def generated(self) -> bool:
        return self.spec in GENERATED_NAMES

    @property
    def name(self) -> str:
        """A short domain name: the file's stem, or `generated`."""
        return "generated" if self.generated else Path(self.spec).stem


def is_mix(data: str | None) -> bool:
    """Whether `data` is a mix spec (a comma, or a `:weight` suffix) rather than one path or name."""
    if not data:
        return False
    if "," in data:
        return True
    head, sep, tail = data.rpartition(":")
    return bool(sep and head) and _number(tail) is not None and not Path(data).exists()


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_mix(data: str) -> list[MixSource]:
    """The sources of a mix spec, weights normalized; every problem in one line."""
    parts = [p.strip() for p in data.split(",")]
    if not any(parts):
        raise CBOPruneError(f"--data {data!r} is an empty mix: pass sources with weights, e.g. "
                            "--data a.json:0.7,b.txt:0.3")
    problems, sources = [], []
    for part in parts:
        if not part:
            problems.append("an empty entry (two commas, or a trailing one)")
            continue
        spec, sep, weight_text = part.rpartition(":")
        weight = _number(weight_text) if sep else None
        if not sep or not spec:
            problems.append(f"{part!r} has no weight (write {part}:0.5)")
            continue
        if weight is None or not math.isfinite(weight) or weight <= 0:
            problems.append(f"{part!r}: the weight {weight_text!r} is not a positive number")
            continue
        spec = "generated" if spec in GENERATED_NAMES else spec
        if spec != "generated":
            path = Path(spec).expanduser()
            if not path.is_file():
                problems.append(f"{spec} is not a file (a mix takes local .jsonl/.json/.txt files and 'generated')")
                continue
            spec = str(path)
        if any(s.spec == spec for s in sources):
            problems.append(f"{spec} is listed twice")
            continue
        sources.append(MixSource(spec, weight))
    if problems:
        raise CBOPruneError(f"--data {data!r}: " + "; ".join(problems))
    total = sum(s.weight for s in sources)
    return [MixSource(s.spec, s.weight / total) for s in sources]
