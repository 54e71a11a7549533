"""Write evaluation results as JSON and as a markdown table."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)


def _fmt(value: float | None, scale: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value * scale:.2f}"


def markdown_table(results: dict) -> str:
    """One row per task and metric: value, ± stderr, n. Accuracies are shown in percent."""
    lines = ["| task | metric | value | ± stderr | n |", "|---|---|---:|---:|---:|"]
    sections = list(results.get("results", {}).items()) + [(f"**{k}**", v) for k, v in results.get("groups", {}).items()]
    for task, entry in sections:
        for metric, value in entry["metrics"].items():
            scale = 100.0 if metric.startswith(("acc", "exact_match")) else 1.0
            err = entry.get("stderr", {}).get(metric)
            lines.append(f"| {task} | {metric}{' (%)' if scale == 100 else ''} | {_fmt(value, scale)} "
                         f"| {_fmt(err, scale)} | {entry['n']} |")
    cfg = results.get("config", {})
    footer = ", ".join(f"{k}={cfg[k]}" for k in ("backend", "model", "limit", "num_fewshot", "seed") if k in cfg)
    return "\n".join(lines) + (f"\n\n{footer}\n" if footer else "\n")


def write_results(results: dict, path: str | Path) -> tuple[Path, Path]:
    """Write `<path>.json` (everything, samples included) and `<path>.md`; return both paths.

    `path` may end in `.json` or `.md`, or be a directory (then `results.json`/`results.md`).
    """
    p = Path(path)
    if p.suffix in (".json", ".md"):
        p = p.with_suffix("")
    elif p.is_dir():
        p = p / "results"
    p.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = p.with_suffix(".json"), p.with_suffix(".md")
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown_table(results), encoding="utf-8")
    log.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path
