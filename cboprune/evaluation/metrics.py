"""Metric aggregation (lm-eval's definitions) and answer extraction for generation tasks."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error `std(ddof=1) / sqrt(n)` (lm-eval's `mean_stderr`)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return float("nan"), None
    if arr.size < 2:
        return float(arr.mean()), None
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))


def mc_predictions(lls: Sequence[float], choice_texts: Sequence[str]) -> tuple[int, int]:
    """`acc` picks the largest log-likelihood, `acc_norm` the largest per character of the choice."""
    lls_arr = np.asarray(lls, dtype=np.float64)
    lengths = np.asarray([float(len(c)) for c in choice_texts])
    return int(np.argmax(lls_arr)), int(np.argmax(lls_arr / lengths))


# ---------------------------------------------------------------- the number a table shows
PRIMARY_METRICS = ("word_perplexity", "acc_norm", "acc", "exact_match")


def primary_metric(task: str, entry: dict[str, Any]) -> tuple[str, float]:
    """The number a table cell shows: word perplexity for perplexity tasks, else acc_norm when
    the task reports it (HellaSwag, ARC), else acc, else the first metric."""
    metrics = entry["metrics"]
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name, float(metrics[name])
    name = next(iter(metrics))
    return name, float(metrics[name])


def primary_scores(evaluation: dict[str, Any]) -> dict[str, float]:
    return {t: primary_metric(t, e)[1] for t, e in evaluation.get("results", {}).items()}


def mean_accuracy(evaluation: dict[str, Any], accuracy_tasks: list[str]) -> float | None:
    """The mean primary metric over the accuracy tasks present (None when there are none)."""
    values = primary_scores(evaluation)
    accs = [values[t] for t in accuracy_tasks if t in values]
    return sum(accs) / len(accs) if accs else None


# ---------------------------------------------------------------- GSM8K (lm-eval `gsm8k`)
_GSM_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_GSM_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def _normalize(text: str, ignore: Sequence[str], ignore_case: bool = True) -> str:
    for pattern in ignore:
        text = re.sub(pattern, "", text)
    return text.lower() if ignore_case else text


def gsm8k_extract(output: str) -> tuple[str, str]:
    """(strict, flexible) answers: `#### N` / the last number in the output."""
    m = _GSM_STRICT.search(output)
    strict = m.group(1) if m else "[invalid]"
    found = _GSM_FLEX.findall(output)
    if found:
        last = found[-1]
        flexible = next((g for g in last if g), "[invalid]") if isinstance(last, tuple) else last
    else:
        flexible = "[invalid]"
    return strict, flexible


def gsm8k_scores(output: str, reference: str) -> dict[str, float]:
    strict, flexible = gsm8k_extract(output)
    ref = _normalize(reference, _GSM_IGNORE)
    return {"exact_match_strict": float(_normalize(strict, _GSM_IGNORE) == ref),
            "exact_match_flexible": float(_normalize(flexible, _GSM_IGNORE) == ref)}


# ---------------------------------------------------------------- BBH (lm-eval `bbh_zeroshot`)
_BBH_IGNORE = (r"\.$", ",", "\n", r"\\\\", '"')


def bbh_extract(output: str, target: str) -> tuple[str, str]:
    """(strict, flexible) answers.

    strict: the whole generation (lm-eval's `take_first`). flexible: by the target's shape —
    the first `(X)` option, the first integer, or the first answer word of the task's kind
    (True/False, Yes/No, valid/invalid); otherwise the first line, stripped.
    """
    strict = output
    t = target.strip()
    if re.fullmatch(r"\([A-Z]\)", t):
        m = re.search(r"\([A-Z]\)", output)
        flexible = m.group(0) if m else output.strip()
    elif re.fullmatch(r"-?\d+", t):
        m = re.search(r"-?\d+", output)
        flexible = m.group(0) if m else output.strip()
    elif t.lower() in {"true", "false", "yes", "no", "valid", "invalid"}:
        m = re.search(r"\b(true|false|yes|no|valid|invalid)\b", output, flags=re.IGNORECASE)
        flexible = m.group(1) if m else output.strip()
    else:
        flexible = output.strip().split("\n")[0].strip()
    return strict, flexible


def bbh_scores(output: str, target: str) -> dict[str, float]:
    strict, flexible = bbh_extract(output, target)
    ref = _normalize(target, _BBH_IGNORE)
    return {"exact_match_strict": float(_normalize(strict, _BBH_IGNORE) == ref),
            "exact_match_flexible": float(_normalize(flexible, _BBH_IGNORE) == ref)}
