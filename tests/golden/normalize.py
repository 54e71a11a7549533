"""The parts of `run`, `compare` and `study` outputs that must not change in a refactor (timings,
paths and file names stripped), as one JSON-able dict."""

from __future__ import annotations

import csv
import json
from pathlib import Path


#: columns added after the capture (new information, not a changed result) and timings
DROPPED = ("selection s", "cost (fwd passes)", "params removed", "prefill ×")


def _csv_rows(path: Path, root: Path) -> list[list[str]]:
    rows = list(csv.reader(path.open(encoding="utf-8")))
    # the "[recommended]" marker follows the default selection, which is not a result of the refactor
    rows = [[cell.replace(str(root), "ROOT").replace(" **[recommended]**", "") for cell in r] for r in rows]
    header = rows[0]
    keep = [i for i, h in enumerate(header) if h not in DROPPED]
    return [[r[i] for i in keep] for r in rows]


def _ranking(data: dict) -> dict:
    return {"method": data["method"], "n_remove": data["n_remove"],
            "candidates": [[c["removed"], round(float(c["score"]), 6)] for c in data["candidates"]]}


def normalize(root: Path) -> dict:
    root = Path(root)
    out: dict = {"run": {}, "compare": {}, "study": {}}
    for p in sorted((root / "run" / "rankings").glob("M*.json")):
        out["run"][p.stem] = _ranking(json.loads(p.read_text()))
    summary = json.loads((root / "run" / "summary.json").read_text())
    out["run"]["checkpoints"] = [[c["n_remove"], c["rank"], c["removed"]] for c in summary["checkpoints"]]
    out["compare"]["table"] = _csv_rows(root / "compare" / "table.csv", root)
    out["compare"]["blocks"] = _csv_rows(root / "compare" / "blocks.csv", root)
    out["study"]["table"] = _csv_rows(root / "study" / "study.csv", root)
    data = json.loads((root / "study" / "results.json").read_text())
    out["study"]["spearman"] = {name: {m: round(v["spearman"], 6) if v["spearman"] == v["spearman"] else None
                                       for m, v in by_m.items()} for name, by_m in data["correlations"].items()}
    return out
