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
import copy
import csv
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cboprune.errors import CBOPruneError

if TYPE_CHECKING:
    from cboprune.ranking import Candidate, Ranking

# This module is imported when the CLI parser is built: torch and the baselines load lazily.
log = logging.getLogger(__name__)

#: "cbo" and the names of `cboprune.baselines.CRITERIA` (kept equal by a test).
METHODS = ("cbo", "bi", "bi-iter", "angular", "norm-ratio", "sleb", "ppl", "taylor", "swm")
#: `cboprune.models.merging.MERGE_RULES` (kept equal by a test).
MERGE_RULES = ("difference", "reference-code")
DEFAULT_MERGE_RULE = "difference"
DEFAULT_METHODS = "cbo,bi,bi-iter,angular,norm-ratio,sleb,ppl,taylor,swm"
DEFAULT_TASKS = "wikitext,arc_easy,hellaswag,piqa,winogrande"
LABELS = {"cbo": "CBO", "bi": "BI one-shot", "bi-iter": "BI iterative", "angular": "Angular distance",
          "norm-ratio": "Norm ratio", "sleb": "SLEB", "ppl": "PPL", "taylor": "Taylor+", "swm": "SWM"}


@dataclass
class Entry:
    """One row of the comparison: a method's configuration at one M and its evaluation."""

    method: str  # "cbo:0", "bi-iter", ...
    n_remove: int
    candidate: Candidate
    ranking: Ranking
    selection_seconds: float
    eval: dict[str, Any] = field(default_factory=dict)
    calib_ppl: float | None = None
    same_as: str | None = None

    @property
    def label(self) -> str:
        base, _, rank = self.method.partition(":")
        return f"{LABELS.get(base, base)}" + (f":{rank}" if rank else "")


@dataclass
class CompareResult:
    output_dir: Path
    entries: list[Entry]
    baseline: dict[str, Any]
    meta: dict[str, Any]


# ----------------------------------------------------------------------------- selection

class _Shared:
    """Lazily computed passes that several criteria share (computed once, charged to the first user)."""

    def __init__(self, model, calibration, batch_size: int):
        self.model, self.calibration, self.batch_size = model, calibration, batch_size
        self._stats = self._single = self._taylor = None

    def stats(self):
        from cboprune.baselines import collect_block_stats

        if self._stats is None:
            self._stats = collect_block_stats(self.model, self.calibration, batch_size=self.batch_size)
        return self._stats

    def single_nll(self):
        from cboprune.baselines import single_removal_nll

        if self._single is None:
            self._single = single_removal_nll(self.model, self.calibration, batch_size=self.batch_size)
        return self._single

    def taylor(self):
        from cboprune.baselines import taylor_scores

        if self._taylor is None:
            self._taylor = taylor_scores(self.model, self.calibration, batch_size=self.batch_size)
        return self._taylor


def _prefix(ranking: Ranking, m: int, score: float) -> Ranking:
    """The ranking of a prefix-consistent greedy method (bi-iter, sleb) for a smaller M."""
    from cboprune.ranking import Candidate, Ranking

    info = dict(ranking.info)
    for key in ("order", "order_shrunk", "step_scores", "step_ppl", "step_block_scores"):
        if key in info:
            info[key] = info[key][:m]
    cand = Candidate(removed=tuple(sorted(info["order"])), score=score, rank=0)
    return Ranking(method=ranking.method, n_blocks=ranking.n_blocks, n_remove=m, candidates=[cand], info=info)


def select(method: str, model, calibration, remove: Sequence[int], shared: _Shared, *, batch_size: int,
           swm_threshold: float | None = None, swm_rule: str = DEFAULT_MERGE_RULE) -> dict[int, Ranking]:
    """Rankings of one peer criterion for every M (greedy methods run once, to the largest M)."""
    from cboprune.baselines import (angular_distance, block_influence, block_influence_iterative, norm_ratio,
                                    perplexity_criterion, sleb, sliding_window_merging, taylor_plus)

    kw = {"batch_size": batch_size}
    if method == "bi":
        return {m: block_influence(model, calibration, m, stats=shared.stats(), **kw) for m in remove}
    if method == "angular":
        return {m: angular_distance(model, calibration, m, stats=shared.stats(), **kw) for m in remove}
    if method == "norm-ratio":
        return {m: norm_ratio(model, calibration, m, stats=shared.stats(), **kw) for m in remove}
    if method == "ppl":
        return {m: perplexity_criterion(model, calibration, m, single_nll=shared.single_nll(), **kw) for m in remove}
    if method == "taylor":
        return {m: taylor_plus(model, calibration, m, scores=shared.taylor(), **kw) for m in remove}
    if method == "bi-iter":
        full = block_influence_iterative(model, calibration, max(remove), first_stats=shared.stats(), **kw)
        return {m: _prefix(full, m, float(sum(full.info["step_scores"][:m]))) for m in remove}
    if method == "sleb":
        full = sleb(model, calibration, max(remove), first_step=shared.single_nll(), **kw)
        return {m: _prefix(full, m, full.info["step_ppl"][m - 1]) for m in remove}
    if method == "swm":
        return {m: sliding_window_merging(model, calibration, m, threshold=swm_threshold, rule=swm_rule, **kw)
                for m in remove}
    raise CBOPruneError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------- evaluation

def _split_tasks(tasks: str, data_dir: str | None) -> tuple[list[str], list[str]]:
    """(perplexity tasks, other tasks) by task kind; unknown names and missing evaluation data fail
    here, before any work."""
    from cboprune.evaluation import resolve_tasks
    from cboprune.evaluation.data import resolve_eval_dir

    specs = resolve_tasks(tasks)
    if not specs:
        raise CBOPruneError("no evaluation task given: pass --tasks, e.g. --tasks wikitext,arc_easy")
    if any(not s.name.startswith("file:") for s in specs):
        resolve_eval_dir(data_dir)
    ppl = [s.name for s in specs if s.kind == "rolling"]
    other = [s.name for s in specs if s.kind != "rolling"]
    return ppl, other


def _evaluate(model, tokenizer, ppl_tasks, other_tasks, *, limit, ppl_limit, batch_size, data_dir, max_length,
              seed, progress) -> dict[str, Any]:
    from cboprune.evaluation import evaluate

    out: dict[str, Any] = {"results": {}, "groups": {}, "config": {}}
    for names, lim in ((ppl_tasks, ppl_limit), (other_tasks, limit)):
        if not names:
            continue
        res = evaluate(model, tokenizer, names, limit=lim, batch_size=batch_size, data_dir=data_dir,
                       max_length=max_length, seed=seed, progress=progress)
        out["results"].update(res["results"])
        out["groups"].update(res.get("groups", {}))
        out["config"].setdefault("seconds", 0.0)
        out["config"]["seconds"] = round(out["config"]["seconds"] + res["config"].get("seconds", 0.0), 2)
    return out


def evaluate_candidate(net, tokenizer, candidate: Candidate, merge_rule: str, calibration, ppl_tasks, other_tasks,
                       ev: dict[str, Any], *, batch_size: int, with_nll: bool = True) -> tuple[dict[str, Any], float | None]:
    """Apply one configuration (removal or merging) to a copy of the model; its evaluation and, when
    `with_nll`, its NLL on `calibration`. The original model stays intact for the next one."""
    from cboprune.baselines import calibration_nll
    from cboprune.models.merging import apply_candidate

    pruned = copy.deepcopy(net)
    apply_candidate(pruned, candidate, merge_rule=merge_rule)
    nll = calibration_nll(pruned, calibration, batch_size=batch_size) if with_nll else None
    return _evaluate(pruned, tokenizer, ppl_tasks, other_tasks, **ev), nll


def configuration_key(candidate: Candidate, merge_rule: str) -> tuple:
    """Configurations with equal keys give the same pruned model (evaluated once)."""
    return candidate.removed, candidate.merged, merge_rule if candidate.merged else None


def primary_metric(task: str, entry: dict[str, Any]) -> tuple[str, float]:
    """The number a Table-1 cell shows: word perplexity for perplexity tasks, else acc_norm when
    the task reports it (HellaSwag, ARC), else acc, else the first metric."""
    metrics = entry["metrics"]
    for name in ("word_perplexity", "acc_norm", "acc", "exact_match"):
        if name in metrics:
            return name, float(metrics[name])
    name = next(iter(metrics))
    return name, float(metrics[name])


# ----------------------------------------------------------------------------- the command

def run_compare(*, model: str = "default", data: str | None = None, n_samples: int = 16, seq_len: int = 128,
                batch_size: int = 8, remove: Sequence[int] = (8,), methods: Sequence[str] | str = DEFAULT_METHODS,
                tasks: str = DEFAULT_TASKS, limit: int | None = None, ppl_limit: int | None = None,
                eval_batch_size: int = 32, data_dir: str | None = None, max_length: int | None = None,
                output_dir: str | Path = "outputs/compare", overwrite: bool = False, cbo_ranks: Sequence[int] = (0,),
                cbo_time_limit: float | None = None, swm_threshold: float | None = None,
                swm_rule: str = DEFAULT_MERGE_RULE, seed: int = 0, device: str | None = None, dtype: str = "float32",
                gen_max_new_tokens: int = 160, progress: bool = True) -> CompareResult:
    """Select blocks with every method at each M, evaluate each pruned model, write the tables."""
    import torch

    from cboprune.baselines import check_names
    from cboprune.data import GenerationSettings, load_calibration
    from cboprune.models import load_model
    from cboprune.models.architectures import decoder_layers
    from cboprune.pipeline import pick_device, prepare_output_dir

    if isinstance(methods, str):
        methods = methods.split(",")
    methods = check_names(methods, METHODS)
    remove = sorted({int(m) for m in remove})
    if not remove or remove[0] < 1:
        raise CBOPruneError(f"--remove needs numbers of blocks M >= 1, got {list(remove)}")
    cbo_ranks = sorted({int(r) for r in cbo_ranks})
    if not cbo_ranks or cbo_ranks[0] < 0:
        raise CBOPruneError(f"--cbo-ranks must be ranks >= 0, got {list(cbo_ranks)}")
    if swm_rule not in MERGE_RULES:
        raise CBOPruneError(f"unknown --swm-rule {swm_rule!r}: use one of {', '.join(MERGE_RULES)}")
    for name, value in (("--limit", limit), ("--ppl-limit", ppl_limit)):
        if value is not None and value < 1:
            raise CBOPruneError(f"{name} must be a positive number of items, got {value}")
    ppl_tasks, other_tasks = _split_tasks(tasks, data_dir)
    out_dir = prepare_output_dir(output_dir, overwrite)
    ppl_limit = ppl_limit if ppl_limit is not None else limit

    started = time.perf_counter()
    torch.manual_seed(seed)
    dev = pick_device(device)
    loaded = load_model(model, dtype=dtype, device=dev)
    net, tokenizer = loaded.model, loaded.tokenizer
    n_blocks = len(decoder_layers(net)[1])
    limit_m = n_blocks - 2 if "swm" in methods else n_blocks - 1
    bad = [m for m in remove if m > limit_m]
    if bad:
        raise CBOPruneError(f"M = {bad} is too large for N = {n_blocks} blocks: choose M <= {limit_m}"
                            + (" (swm never merges the last block)" if "swm" in methods else ""))
    calibration = load_calibration(data, tokenizer, model=net, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                   generation=GenerationSettings(max_new_tokens=gen_max_new_tokens, seed=seed))
    if "cbo" in methods and calibration.n_samples < n_blocks:
        log.warning("compare: %d calibration samples for N = %d blocks: the CBO matrix H = AᵀA/m has rank <= %d, "
                    "so the solver can pick states in its null space (energy ~0, real loss large). Use "
                    "--n-samples >= N (the paper uses 2048)", calibration.n_samples, n_blocks, calibration.n_samples)
    log.info("compare: %s (N = %d), calibration %s, methods %s, M = %s", model, n_blocks,
             calibration.describe(), methods, remove)

    # 1. selection
    entries: list[Entry] = []
    shared = _Shared(net, calibration, batch_size)
    hessian_meta: dict[str, Any] = {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "cbo":
            from cboprune.hessian import compute_hessian
            from cboprune.pipeline import solve_rankings

            hessian = compute_hessian(net, calibration, batch_size=batch_size, model_name=model, progress=progress)
            rankings = solve_rankings(hessian, remove, max(cbo_ranks) + 1, time_limit=cbo_time_limit, seed=seed)
            hessian_meta = {k: v for k, v in hessian.meta.items() if k not in ("block_names",)}
            seconds = time.perf_counter() - t0
            for ranking in rankings:
                for rank in cbo_ranks:
                    if rank < len(ranking.candidates):
                        entries.append(Entry(f"cbo:{rank}", ranking.n_remove, ranking.candidates[rank], ranking,
                                             round(seconds, 2)))
        else:
            rankings_by_m = select(method, net, calibration, remove, shared, batch_size=batch_size,
                                   swm_threshold=swm_threshold, swm_rule=swm_rule)
            seconds = time.perf_counter() - t0
            for m in remove:
                entries.append(Entry(method, m, rankings_by_m[m].best, rankings_by_m[m], round(seconds, 2)))
        log.info("compare: %s selected in %.1f s", method, seconds)
    entries.sort(key=lambda e: (e.n_remove, methods.index(e.method.partition(":")[0]), e.method))
    selection_seconds = round(time.perf_counter() - started, 2)

    # 2. evaluation: the original model, then every distinct configuration once
    t0 = time.perf_counter()
    ev = dict(limit=limit, ppl_limit=ppl_limit, batch_size=eval_batch_size, data_dir=data_dir,
              max_length=max_length, seed=seed, progress=progress)
    from cboprune.baselines import calibration_nll

    baseline = _evaluate(net, tokenizer, ppl_tasks, other_tasks, **ev)
    baseline["calib_ppl"] = math.exp(calibration_nll(net, calibration, batch_size=batch_size))
    done: dict[tuple, Entry] = {}
    for entry in entries:
        rule = entry.ranking.info.get("merge_rule", DEFAULT_MERGE_RULE)
        key = configuration_key(entry.candidate, rule)
        if key in done:
            entry.eval, entry.calib_ppl, entry.same_as = done[key].eval, done[key].calib_ppl, done[key].method
            continue
        entry.eval, nll = evaluate_candidate(net, tokenizer, entry.candidate, rule, calibration, ppl_tasks,
                                             other_tasks, ev, batch_size=batch_size)
        entry.calib_ppl = math.exp(nll)
        done[key] = entry
        log.info("compare: evaluated %s at M = %d", entry.method, entry.n_remove)
    eval_seconds = round(time.perf_counter() - t0, 2)

    meta = {"model": model, "n_blocks": n_blocks, "methods": methods, "remove": remove, "cbo_ranks": cbo_ranks,
            "tasks": ppl_tasks + other_tasks, "ppl_tasks": ppl_tasks, "limit": limit, "ppl_limit": ppl_limit, "max_length": max_length,
            "calibration": calibration.describe(), "batch_size": batch_size, "seed": seed, "device": dev,
            "dtype": dtype, "torch_threads": torch.get_num_threads(), "swm_rule": swm_rule,
            "swm_threshold": swm_threshold, "seconds": {"selection": selection_seconds, "evaluation": eval_seconds,
                                                        "total": round(time.perf_counter() - started, 2)},
            "hessian": hessian_meta}
    result = CompareResult(output_dir=out_dir, entries=entries, baseline=baseline, meta=meta)
    write_outputs(result)
    return result


# ----------------------------------------------------------------------------- outputs

def _tasks(result: CompareResult) -> list[str]:
    return list(result.baseline["results"])


def table_rows(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """Table 1: # br, method, calibration perplexity, one column per task, selection seconds."""
    tasks = _tasks(result)
    header = ["# br", "method", "calib ppl"]
    for t in tasks:
        metric, _ = primary_metric(t, result.baseline["results"][t])
        header.append(f"{t} ({metric})")
    header.append("selection s")

    def cells(evaluation: dict, calib_ppl: float | None) -> list[str]:
        row = [f"{calib_ppl:.2f}" if calib_ppl is not None else "—"]
        for t in tasks:
            entry = evaluation.get("results", {}).get(t)
            if entry is None:
                row.append("—")
                continue
            metric, value = primary_metric(t, entry)
            row.append(f"{value:.2f}" if "perplexity" in metric else f"{value:.3f}")
        return row

    rows = [["0", f"original ({result.meta['model']})", *cells(result.baseline, result.baseline.get("calib_ppl")), "—"]]
    for e in result.entries:
        rows.append([str(e.n_remove), e.label + (f" (= {e.same_as})" if e.same_as else ""),
                     *cells(e.eval, e.calib_ppl), f"{e.selection_seconds:.1f}"])
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
        base = e.method.partition(":")[0]
        if base == "bi-iter":
            order = f"{_fmt_list(info['order_shrunk'])} (original: {_fmt_list(info['order'])})"
        elif base == "sleb":
            order = _fmt_list(info["order"])
        else:
            order = ""
        rows.append([str(e.n_remove), e.label, _fmt_list(e.candidate.removed), order,
                     _fmt_list(e.candidate.merged) if e.candidate.merged else "", f"{e.candidate.score:.6g}"])
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def plot_comparison(result: CompareResult, path: str | Path) -> Path:
    """Left: which blocks each method removes (dark) or merges into an anchor (light), one row per
    M and method. Right: each row's scores relative to the original model (accuracy ratio; for
    perplexity, original / pruned so that higher is better everywhere)."""
    from cboprune.report.plots import _pyplot

    plt = _pyplot()
    import numpy as np

    n = result.meta["n_blocks"]
    labels = [f"M={e.n_remove} {e.label}" for e in result.entries]
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


def write_outputs(result: CompareResult) -> dict[str, Path]:
    out = result.output_dir
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
              + "; no retraining. "
              f"Time: selection {secs['selection']} s, evaluation {secs['evaluation']} s, total {secs['total']} s.\n")
    paths["table_md"].write_text(_markdown(h1, r1) + footer, encoding="utf-8")
    _csv(paths["table_csv"], h1, r1)
    paths["blocks_md"].write_text(_markdown(h2, r2), encoding="utf-8")
    _csv(paths["blocks_csv"], h2, r2)
    plot_comparison(result, paths["plot"])
    data = {"meta": result.meta, "baseline": result.baseline,
            "entries": [{"method": e.method, "n_remove": e.n_remove, "candidate": e.candidate.to_dict(),
                         "ranking": e.ranking.to_dict(), "selection_seconds": e.selection_seconds,
                         "calib_ppl": e.calib_ppl, "same_as": e.same_as, "eval": e.eval} for e in result.entries]}
    paths["json"].write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- CLI

def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,17, got {text!r}") from None


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """Register the `compare` subcommand's arguments."""
    p.add_argument("--model", default="default", help="hub id, checkpoint directory, .gguf file or 'default'")
    p.add_argument("--data", help="calibration .jsonl/.json/.txt file or hub dataset (default: model-generated)")
    p.add_argument("--n-samples", type=int, default=16, help="calibration samples (default 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass (default 8)")
    p.add_argument("--remove", type=int, nargs="+", required=True, metavar="M", help="numbers of blocks to remove")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, from: {', '.join(METHODS)} "
                                                             f"(default: all)")
    p.add_argument("--cbo-ranks", type=_int_list, default=[0], help="CBO states to evaluate, e.g. 0,17 (default 0)")
    p.add_argument("--cbo-time-limit", type=float, help="CBO solver budget per M in seconds")
    p.add_argument("--swm-threshold", type=float, help="fixed SWM similarity threshold (default: the highest "
                                                       "threshold that merges M blocks, found by bisection)")
    p.add_argument("--swm-rule", default=DEFAULT_MERGE_RULE, choices=MERGE_RULES, help="SWM weight rule")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"evaluation tasks (default {DEFAULT_TASKS})")
    p.add_argument("--limit", type=int, help="first N items of each task")
    p.add_argument("--ppl-limit", type=int, help="documents for perplexity tasks (default: --limit)")
    p.add_argument("--max-length", type=int, help="evaluation context window (default: the model's, at most 2048)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--data-dir", help="folder holding eval/ (default: $CBOPRUNE_DATA_DIR, then ../shared/data)")
    p.add_argument("--output-dir", default="outputs/compare")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32")


def run_compare_command(args: argparse.Namespace) -> int:
    """Run `cboprune compare`, print both tables, return 0."""
    result = run_compare(model=args.model, data=args.data, n_samples=args.n_samples, seq_len=args.seq_len,
                         batch_size=args.batch_size, remove=args.remove, methods=args.methods, tasks=args.tasks,
                         limit=args.limit, ppl_limit=args.ppl_limit, eval_batch_size=args.eval_batch_size,
                         data_dir=args.data_dir, max_length=args.max_length, output_dir=args.output_dir,
                         overwrite=args.overwrite, cbo_ranks=args.cbo_ranks, cbo_time_limit=args.cbo_time_limit,
                         swm_threshold=args.swm_threshold, swm_rule=args.swm_rule, seed=args.seed, device=args.device,
                         dtype=args.dtype, progress=not getattr(args, "quiet", False))
    out = result.output_dir
    print((out / "table.md").read_text(encoding="utf-8"))
    print((out / "blocks.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'table.md'}, {out / 'table.csv'}, {out / 'blocks.md'}, {out / 'blocks.csv'}, "
          f"{out / 'compare.png'}, {out / 'results.json'}")
    return 0
