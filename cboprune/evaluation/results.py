"""Write evaluation results: JSON in lm-eval's own results schema (plus our summary) and markdown.

The JSON file reads like the `results_*.json` that `lm_eval --output_path` writes (`results`,
`groups`, `group_subtasks`, `configs`, `versions`, `n-shot`, `higher_is_better`, `n-samples`,
`config`, ... with metric keys `"acc,none"`, `"acc_stderr,none"`), so tools that read lm-eval
output read ours. The key `cboprune` holds this package's summary (per task `metrics`,
`stderr`, `n`, `config`; groups; run configuration; per-item samples with `--log-samples`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from cboprune.core.errors import CBOPruneError
from cboprune.core.finite import is_number, metric_cell
from cboprune.core.outputs import dumps_strict, write_texts

log = logging.getLogger(__name__)

_LOWER_IS_BETTER = ("perplexity", "bits_per_byte")
_SUFFIXES = (".json", ".md")


def _fmt(value: float | None, scale: float) -> str:
    return metric_cell(value if not is_number(value) else value * scale, ".2f")


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


def _lm_eval_entry(name: str, entry: dict) -> dict:
    out: dict[str, Any] = {"alias": name}
    for metric, value in entry["metrics"].items():
        out[f"{metric},none"] = value
        err = entry.get("stderr", {}).get(metric)
        out[f"{metric}_stderr,none"] = "N/A" if err is None else err
    return out


def to_lm_eval_schema(results: dict) -> dict:
    """`results` (the dict `evaluate()` returns) in lm-eval's results schema, ours under `cboprune`.

    Tasks scored by lm-eval keep lm-eval's own entries and configs unchanged; tasks scored by the
    built-in evaluator get entries of the same form (`"<metric>,none"`, `"<metric>_stderr,none"`).
    """
    raw = results.get("lm_eval") or {}
    out: dict[str, Any] = {key: dict(raw.get(key, {})) for key in
                           ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                            "higher_is_better", "n-samples")}
    for name, entry in results.get("results", {}).items():
        if entry["config"].get("backend", "builtin") != "builtin":
            continue
        out["results"][name] = _lm_eval_entry(name, entry)
        out["n-shot"][name] = entry["config"].get("num_fewshot", 0)
        out["n-samples"][name] = {"original": entry["n"], "effective": entry["n"]}
        out["higher_is_better"][name] = {m: not m.endswith(_LOWER_IS_BETTER) for m in entry["metrics"]}
        out["configs"][name] = {"task": name, "cboprune_builtin": True, **entry["config"]}
    for name, entry in results.get("groups", {}).items():
        if name not in out["groups"]:
            out["groups"][name] = _lm_eval_entry(name, entry)
            out["group_subtasks"][name] = [t for t in results["results"] if t.startswith(f"{name}_")]
    out["config"] = {**raw.get("config", {}), **{k: v for k, v in results.get("config", {}).items()
                                                  if k not in raw.get("config", {})}}
    out["date"] = raw.get("date", time.time())
    for key in ("lm_eval_version", "git_hash", "transformers_version"):
        if key in raw:
            out[key] = raw[key]
    out["cboprune"] = {k: v for k, v in results.items() if k != "lm_eval"}
    return out


def output_paths(path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """The (json, md) files `--output PATH` writes, checked before any work is done.

    `PATH` is a file stem (`out/eval` -> `out/eval.json` + `out/eval.md`; a `.json`/`.md` suffix
    is dropped). One-line `CBOPruneError` when PATH is an existing directory (`.` included) or
    file, a target is a directory or exists without `overwrite`, or the folder cannot be written.
    """
    raw = Path(path).expanduser()
    if raw.is_dir() or str(path).rstrip("/\\") in ("", ".", ".."):
        raise CBOPruneError(f"--output {path} is a directory: pass a file stem such as {Path(path) / 'eval'} "
                            "(writes eval.json and eval.md)")
    stem = raw.with_suffix("") if raw.suffix in _SUFFIXES else raw
    if stem == raw and raw.is_file():
        raise CBOPruneError(f"--output {path} is an existing file: pass a new file stem (it writes "
                            f"{stem.name}.json and {stem.name}.md)")
    targets = (Path(f"{stem}.json"), Path(f"{stem}.md"))
    for target in targets:
        if target.is_dir():
            raise CBOPruneError(f"--output target {target} is a directory: pass another --output")
        if target.exists() and not overwrite:
            raise CBOPruneError(f"--output target {target} exists: choose another --output or pass --overwrite")
    parent = stem.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CBOPruneError(f"--output {path}: {parent} is a file, not a folder; pass another --output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CBOPruneError(f"--output {path}: folder {parent} is not writable; pass another --output")
    return targets


def _json_default(o: Any) -> Any:
    """numpy scalars as numbers, sets as lists, anything else as its string (lm-eval's rule)."""
    if hasattr(o, "item") and callable(o.item):
        return o.item()
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    return str(o)


def write_results(results: dict, path: str | Path, *, overwrite: bool = True) -> tuple[Path, Path]:
    """Write `<path>.json` (lm-eval's schema + `cboprune` summary, samples included) and `<path>.md`.

    `path` may end in `.json` or `.md`. Both files appear together or not at all.
    """
    json_path, md_path = output_paths(path, overwrite=overwrite)
    doc = to_lm_eval_schema(results)
    write_texts([(json_path, dumps_strict(doc, indent=2, default=_json_default) + "\n"),
                 (md_path, markdown_table(results))])
    log.info("wrote %s and %s", json_path, md_path)
    return json_path, md_path
