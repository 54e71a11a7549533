"""`cboprune compare`: CBO and its peers at equal M, on the same calibration data, evaluated alike.

    cboprune compare --remove 8 12 --methods cbo,bi,bi-iter,angular,norm-ratio,sleb,ppl,taylor,swm \\
        --data ../shared/data/calib/alpaca_en_demo.json --tasks wikitext,arc_easy --limit 50

The model and calibration set are loaded once, CBO runs exactly as in `cboprune run` (Hessian ->
solve), every other criterion comes from `cboprune.baselines`, and each selected configuration is
applied by surgery (removal or merging) to a copy of the model and evaluated with
`cboprune.evaluation`. Outputs (in --output-dir): `table.md`/`table.csv` (the paper's Table 1:
one row per M and method), `blocks.md`/`blocks.csv` (its Table 2: the blocks each method removes or
merges), `compare.png`, and `results.json` with every ranking and evaluation.

No retraining happens here: the numbers compare the criteria before healing.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cboprune.core import methods as registry
from cboprune.core.config import config_from_args
from cboprune.engine.skeleton import start_experiment
from cboprune.evaluation.domains import domain_markdown
from cboprune.evaluation.metrics import primary_metric
from cboprune.engine.experiment import cost_of, energy_entries, entry_dict, peer_entries
from cboprune.core.finite import metric_cell
from cboprune.engine.healing_study import healing_markdown
from cboprune.core.methods import entry_label
from cboprune.core.outputs import dumps_strict
from cboprune.core.ranking import Entry
from cboprune.engine.repair_comparison import repair_markdown
from cboprune.report.plots import _pyplot
from cboprune.report.tables import markdown_table, write_csv
from cboprune.engine.resume import entries_from_state, entries_state

log = logging.getLogger(__name__)


@dataclass
class CompareResult:
    output_dir: Path
    entries: list[Entry]
    baseline: dict[str, Any]
    meta: dict[str, Any]


def run_compare(cfg, *, progress: bool = True) -> CompareResult:
    """Select blocks with every method at each M (CBO: the paper's energy, ranks `cbo_ranks`),
    evaluate each distinct pruned model once, write the tables. `cfg`: a `Config` for "compare"."""
    names = registry.parse_names(cfg.methods, extra=("cbo",))
    run = start_experiment(cfg, "compare", min_kept=max(registry.get(n).min_kept for n in names), progress=progress,
                           options={"swm_threshold": cfg.swm_threshold, "swm_rule": cfg.swm_rule})
    session, calibration, context = run.session, run.session.fit, run.context
    if "cbo" in names and calibration.n_samples < session.n_blocks:
        log.warning("compare: %d calibration samples for N = %d blocks: the CBO matrix H = AᵀA/m has rank <= %d, "
                    "so the solver can pick states in its null space (energy ~0, real loss large). Use "
                    "--n-samples >= N (the paper uses 2048)", calibration.n_samples, session.n_blocks,
                    calibration.n_samples)
    entries: list[Entry] = []
    hessian_meta: dict[str, Any] = {}

    def select(name: str):
        if name == "cbo":
            ranks = sorted(set(cfg.cbo_ranks))
            selected = energy_entries("fisher", context, cfg.remove, ranks=ranks, k=max(ranks) + 1,
                                      alias="cbo").entries
        else:
            selected = peer_entries(name, context, cfg.remove)
        hessian = context.cache.get("hessian")
        meta = {k: v for k, v in hessian.meta.items() if k != "block_names"} if hessian is not None else hessian_meta
        return (selected, meta), {"entries": entries_state(selected), "hessian": meta}

    for name in names:
        selected, meta = run.step("selection", name, lambda v: (entries_from_state(v["entries"]),
                                                                dict(v.get("hessian") or {})), lambda: select(name))
        entries += selected
        hessian_meta = meta or hessian_meta
    entries.sort(key=lambda e: (e.n_remove, names.index(e.base), e.method))

    baseline = run.evaluate(entries, nll_samples=calibration, key="calib_nll", speedup=cfg.speedup,
                            cost=lambda e: cost_of(e, session.n_blocks, fit_tokens=calibration.n_tokens))
    baseline["calib_ppl"] = math.exp(baseline.pop("calib_nll"))
    run.heal(entries, nll_samples=calibration)
    meta = {**run.meta(), "methods": names, "cbo_ranks": sorted(set(cfg.cbo_ranks)),
            "calibration": calibration.describe(), "swm_rule": cfg.swm_rule, "swm_threshold": cfg.swm_threshold,
            "seconds": run.timings(), "hessian": hessian_meta}
    result = CompareResult(output_dir=run.out_dir, entries=entries, baseline=baseline, meta=meta)
    run.write(lambda stage: write_outputs(result, stage))
    return result


# ----------------------------------------------------------------------------- outputs

def _tasks(result: CompareResult) -> list[str]:
    return list(result.baseline["results"])


def _calib_ppl(entry: Entry) -> float | None:
    return math.exp(entry.nll) if entry.nll is not None else None


def table_rows(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """Table 1: # br, method, calibration perplexity, one column per task, selection seconds."""
    tasks = _tasks(result)
    header = ["# br", "method", "calib ppl"]
    for t in tasks:
        metric, _ = primary_metric(t, result.baseline["results"][t])
        header.append(f"{t} ({metric})")
    header += ["params removed", "prefill ×", "cost (fwd passes)", "selection s"]

    def cells(evaluation: dict, calib_ppl: float | None) -> list[str]:
        row = [metric_cell(calib_ppl, ".2f")]
        for t in tasks:
            entry = evaluation.get("results", {}).get(t)
            if entry is None:
                row.append("—")
                continue
            metric, value = primary_metric(t, entry)
            row.append(metric_cell(value, ".2f" if "perplexity" in metric else ".3f"))
        return row

    rows = [["0", f"original ({result.meta['model']})", *cells(result.baseline, result.baseline.get("calib_ppl")),
             "—", "1.00", "—", "—"]]
    for e in result.entries:
        rows.append([str(e.n_remove), entry_label(e.method) + (f" (= {e.same_as})" if e.same_as else ""),
                     *cells(e.eval, _calib_ppl(e)),
                     f"{e.speedup['params_removed_fraction']:.1%}" if e.speedup else "—",
                     f"{e.speedup['prefill_speedup']:.2f}" if e.speedup else "—",
                     "—" if e.cost is None else f"{e.cost:g}",
                     f"{e.selection_seconds:.1f}"])
    return header, rows


def _fmt_list(items: Sequence) -> str:
    return "[" + ", ".join(str(list(i)) if isinstance(i, (tuple, list)) else str(i) for i in items) + "]"


def block_rows(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """Table 2: the blocks each method removes (sorted original indices), the removal order where
    the method has one (bi-iter also in the paper's current-model indices), and merged groups."""
    header = ["# br", "method", "blocks removed", "order (paper notation)", "merged groups", "score"]
    rows = []
    for e in result.entries:
        info = e.ranking.info
        base = e.base
        if base == "bi-iter":
            order = f"{_fmt_list(info['order_shrunk'])} (original: {_fmt_list(info['order'])})"
        elif base == "sleb":
            order = _fmt_list(info["order"])
        else:
            order = ""
        rows.append([str(e.n_remove), entry_label(e.method), _fmt_list(e.candidate.removed), order,
                     _fmt_list(e.candidate.merged) if e.candidate.merged else "", f"{e.candidate.score:.6g}"])
    return header, rows


def plot_comparison(result: CompareResult, path: str | Path) -> Path:
    """Left: which blocks each method removes (dark) or merges into an anchor (light), one row per
    M and method. Right: each row's scores relative to the original model (accuracy ratio; for
    perplexity, original / pruned so that higher is better everywhere)."""

    plt = _pyplot()
    import numpy as np

    n = result.meta["n_blocks"]
    labels = [f"M={e.n_remove} {entry_label(e.method)}" for e in result.entries]
    grid = np.zeros((len(result.entries), n))
    for r, e in enumerate(result.entries):
        grid[r, list(e.candidate.removed)] = 1.0
        for g in e.candidate.merged:
            grid[r, g[0]] = 0.5
    tasks = _tasks(result)
    rel = np.full((len(result.entries), len(tasks)), np.nan)
    for r, e in enumerate(result.entries):
        for c, t in enumerate(tasks):
            base = primary_metric(t, result.baseline["results"][t])
            if t in e.eval.get("results", {}):
                metric, value = primary_metric(t, e.eval["results"][t])
                rel[r, c] = base[1] / value if "perplexity" in metric else value / max(base[1], 1e-12)
    height = max(3.0, 0.35 * len(labels) + 1.5)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12 + 0.1 * n, height),
                                   gridspec_kw={"width_ratios": [max(n, 8), max(len(tasks), 1) * 2]})
    ax1.imshow(grid, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax1.set_yticks(range(len(labels)), labels, fontsize=8)
    ax1.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax1.set_xlabel("block (dark: removed, grey: merge anchor)")
    im = ax2.imshow(rel, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
    ax2.set_yticks([])
    ax2.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
    for r in range(rel.shape[0]):
        for c in range(rel.shape[1]):
            if not np.isnan(rel[r, c]):
                ax2.text(c, r, f"{rel[r, c]:.2f}", ha="center", va="center", fontsize=7)
    ax2.set_title("score / original (ppl: original / pruned)", fontsize=9)
    fig.colorbar(im, ax=ax2, fraction=0.05)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(result: CompareResult, directory: Path | None = None) -> dict[str, Path]:
    out = Path(directory or result.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    h1, r1 = table_rows(result)
    h2, r2 = block_rows(result)
    paths = {"table_md": out / "table.md", "table_csv": out / "table.csv", "blocks_md": out / "blocks.md",
             "blocks_csv": out / "blocks.csv", "plot": out / "compare.png", "json": out / "results.json"}
    secs = result.meta["seconds"]
    cal = result.meta["calibration"]
    footer = (f"\nModel {result.meta['model']} (N = {result.meta['n_blocks']}); calibration {cal.get('source')} "
              f"({cal.get('n_samples')} samples, {cal.get('n_tokens')} tokens); tasks limited to "
              f"{result.meta['limit']} items"
              + (f" ({result.meta['ppl_limit']} documents for perplexity)" if result.meta.get("ppl_tasks") else "")
              + ("; no retraining. " if not result.meta.get("healing") else "; before healing (after: healing.md). ")
              + f"Cost: forward passes of the fitting set (a backward counts as two). "
              f"Time: selection {secs['selection']} s, evaluation {secs['evaluation']} s, total {secs['total']} s.\n")
    paths["table_md"].write_text(markdown_table(h1, r1) + footer, encoding="utf-8")
    write_csv(paths["table_csv"], h1, r1)
    paths["blocks_md"].write_text(markdown_table(h2, r2), encoding="utf-8")
    write_csv(paths["blocks_csv"], h2, r2)
    plot_comparison(result, paths["plot"])
    if result.meta.get("repair"):
        paths["repair_md"] = out / "repair.md"
        paths["repair_md"].write_text(repair_markdown(result.entries, result.meta, entry_label), encoding="utf-8")
    if result.baseline.get("domains"):
        paths["domains_md"] = out / "domains.md"
        paths["domains_md"].write_text(domain_markdown(result.entries, result.baseline, entry_label,
                                                       (result.meta.get("healing") or {}).get("steps")),
                                       encoding="utf-8")
    if result.meta.get("healing"):
        paths["healing_md"] = out / "healing.md"
        paths["healing_md"].write_text(healing_markdown(result.entries, result.meta, entry_label), encoding="utf-8")
    data = {"meta": result.meta, "baseline": result.baseline,
            "entries": [entry_dict(e, "calib_ppl") for e in result.entries]}
    paths["json"].write_text(dumps_strict(data, indent=2, default=str) + "\n", encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- CLI

def run_compare_command(args: argparse.Namespace) -> int:
    """Run `cboprune compare`, print both tables, return 0."""

    result = run_compare(config_from_args(args, "compare"), progress=not getattr(args, "quiet", False))
    out = result.output_dir
    print((out / "table.md").read_text(encoding="utf-8"))
    print((out / "blocks.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'blocks.md'}, {out / 'blocks.csv'}, "
          f"{out / 'compare.png'}, {out / 'results.json'}")
    return 0
