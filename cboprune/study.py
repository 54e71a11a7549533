"""`cboprune study`: how well does each energy model predict real quality, and which choice wins?

    cboprune study --remove 4 8 12 --data ../shared/data/calib/alpaca_en_demo.json --limit 100

For one model and several M, on one calibration set split into a fitting part and a held-out part:

1. every energy model (`cboprune.energy`) is built on the fitting part and its K lowest states are
   listed; each state's real loss is measured on the held-out part (`cboprune.verify`), giving the
   Spearman correlation between energy and held-out loss, and two configurations per model: the
   ground state (`<model>:0`) and the best verified state (`<model>+verify`);
2. every peer criterion (`cboprune.baselines`) selects its configuration on the same fitting part;
3. every distinct configuration is evaluated the same way: held-out calibration perplexity,
   WikiText-2 perplexity and the accuracy tasks (`--limit` items each);
4. `study.md` (tables: per M, every configuration; Spearman per model and M; the recommended
   approach against the best peer), `study.csv`, `energy_vs_loss.png` (scatter per model and M),
   `frequency_<model>.png` (the paper's Fig. 3 per model) and `results.json` are written.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cboprune.energy import ENERGY_MODELS, RECOMMENDED
from cboprune.errors import CBOPruneError

# Imported when the CLI parser is built: torch, the solvers and the baselines load lazily.
log = logging.getLogger(__name__)

PEERS = ("bi", "bi-iter", "angular", "norm-ratio", "sleb", "ppl", "taylor", "swm")
ENERGY_NAMES = tuple(ENERGY_MODELS)
DEFAULT_ENERGIES = ",".join(ENERGY_NAMES)
DEFAULT_PEERS = ",".join(PEERS)
DEFAULT_TASKS = "wikitext,arc_easy,hellaswag,piqa,winogrande"


@dataclass
class StudyEntry:
    method: str  # "fisher:0", "measured+verify", "bi", ...
    n_remove: int
    candidate: Any
    ranking: Any
    selection_seconds: float
    heldout_nll: float | None = None
    eval: dict[str, Any] = field(default_factory=dict)
    same_as: str | None = None

    @property
    def kind(self) -> str:
        base = self.method.split(":")[0].split("+")[0]
        return "energy" if base in ENERGY_NAMES else "peer"


@dataclass
class StudyResult:
    output_dir: Path
    entries: list[StudyEntry]
    baseline: dict[str, Any]
    correlations: dict[str, dict[int, dict[str, Any]]]  # model -> M -> {spearman, energies, nll, ...}
    meta: dict[str, Any]


def recommended_method() -> str:
    """The study entry that `cboprune run` produces by default."""
    r = RECOMMENDED
    return f"{r.energy}+refine" if r.refine_sweeps else f"{r.energy}+verify" if r.verify else f"{r.energy}:0"


def run_study(*, model: str = "default", data: str | None = None, n_samples: int = 64, n_heldout: int = 32,
              seq_len: int = 256, batch_size: int = 8, remove: Sequence[int] = (4, 8, 12),
              energies: Sequence[str] | str = DEFAULT_ENERGIES, peers: Sequence[str] | str = DEFAULT_PEERS,
              k: int = 10, refine: Sequence[str] | str = ("measured",), max_sweeps: int = 8,
              diverse: float | None = None, pool: int | None = None, relin_step: int = 4,
              exact_samples: int | None = None, tasks: str = DEFAULT_TASKS, limit: int | None = None,
              ppl_limit: int | None = None, eval_batch_size: int = 32, data_dir: str | None = None,
              max_length: int | None = None, output_dir: str | Path = "outputs/study", overwrite: bool = False,
              solver_time_limit: float | None = None, seed: int = 0, device: str | None = None,
              dtype: str = "float32", progress: bool = True) -> StudyResult:
    import torch

    from cboprune.baselines import calibration_nll, check_names
    from cboprune.compare import (DEFAULT_MERGE_RULE, _evaluate, _Shared, _split_tasks, configuration_key,
                                  evaluate_candidate, select)
    from cboprune.data import load_calibration
    from cboprune.energy import check_energy_names, from_hessian, measure_losses, relinearized_rankings
    from cboprune.hessian import compute_hessian
    from cboprune.models import load_model
    from cboprune.models.architectures import blocks
    from cboprune.pipeline import pick_device, prepare_output_dir
    from cboprune.verify import diverse as diverse_set
    from cboprune.verify import refine as refine_state
    from cboprune.verify import verify

    energies = check_energy_names(energies.split(",") if isinstance(energies, str) else energies)
    refine = check_energy_names(refine.split(",") if isinstance(refine, str) else refine)
    refine = [r for r in refine if r in energies]
    peers = check_names(peers.split(",") if isinstance(peers, str) else peers, PEERS) if peers else []
    remove = sorted({int(m) for m in remove})
    if not remove or remove[0] < 1:
        raise CBOPruneError(f"--remove needs numbers of blocks M >= 1, got {list(remove)}")
    for name, value in (("--k", k), ("--n-heldout", n_heldout), ("--n-samples", n_samples),
                        ("--limit", limit or 1), ("--ppl-limit", ppl_limit or 1)):
        if value < 1:
            raise CBOPruneError(f"{name} must be >= 1, got {value}")
    if diverse is not None and not 0 <= diverse < 1:
        raise CBOPruneError(f"--diverse is a Jaccard similarity in [0, 1), got {diverse}")
    ppl_tasks, other_tasks = _split_tasks(tasks, data_dir)
    out_dir = prepare_output_dir(output_dir, overwrite)
    ppl_limit = ppl_limit if ppl_limit is not None else limit

    started = time.perf_counter()
    torch.manual_seed(seed)
    dev = pick_device(device)
    loaded = load_model(model, dtype=dtype, device=dev)
    net, tokenizer = loaded.model, loaded.tokenizer
    kinds = [b.kind for b in blocks(net)]
    n_blocks = len(kinds)
    too_big = [m for m in remove if m > n_blocks - 2]
    if too_big:
        raise CBOPruneError(f"M = {too_big} is too large for N = {n_blocks} blocks: choose M <= {n_blocks - 2}")
    if pool is not None and pool < max(remove):
        raise CBOPruneError(f"--pool {pool} is smaller than the largest M = {max(remove)}: the measured model "
                            "could not remove enough blocks")
    everything = load_calibration(data, tokenizer, model=net, n_samples=n_samples + n_heldout, seq_len=seq_len,
                                  seed=seed)
    fit, heldout = everything.split(n_samples)
    log.info("study: %s (N = %d), fitting %s, held-out %s, energy models %s, peers %s, M = %s", model, n_blocks,
             fit.describe(), heldout.n_samples, energies, peers, remove)
    solve_kw = {"time_limit": solver_time_limit, "seed": seed}
    pool_k = k * 5 if diverse is not None else k

    # 1. energy models -> K lowest states -> verified on the held-out part
    entries: list[StudyEntry] = []
    correlations: dict[str, dict[int, dict[str, Any]]] = {}
    rankings_by_model: dict[str, list] = {}
    costs: dict[str, float] = {}
    hessian = None
    t0 = time.perf_counter()
    if any(e in ("fisher", "fisher-linear", "relinearized") for e in energies):  # exact makes its own
        hessian = compute_hessian(net, fit, batch_size=batch_size, model_name=model, progress=progress)
    costs["gate gradients"] = time.perf_counter() - t0
    for name in energies:
        t0 = time.perf_counter()
        if name in ("fisher", "fisher-linear"):
            energy_model = from_hessian(hessian, name)
            rankings = {m: energy_model.rank(m, pool_k, **solve_kw) for m in remove}
        elif name == "exact":
            sub = fit if exact_samples is None or exact_samples >= fit.n_samples else fit.split(exact_samples)[0]
            exact_h = compute_hessian(net, sub, batch_size=batch_size, model_name=model, progress=progress,
                                      variant="exact")
            energy_model = from_hessian(exact_h, name)
            rankings = {m: energy_model.rank(m, pool_k, **solve_kw) for m in remove}
        elif name == "measured":
            measured = measure_losses(net, fit, pool_size=pool, batch_size=batch_size)
            energy_model = measured.energy_model()
            rankings = {m: energy_model.rank(m, pool_k, **solve_kw) for m in remove}
        else:
            energy_model = None  # one local model per expansion point
            rankings = relinearized_rankings(net, fit, remove, pool_k, step=relin_step, first=hessian,
                                             batch_size=batch_size, progress=progress, **solve_kw)
        build = time.perf_counter() - t0
        costs[name] = build
        rankings_by_model[name] = []
        correlations[name] = {}
        for m in remove:
            ranking = rankings[m]
            if diverse is not None:
                ranking = diverse_set(ranking, k, diverse)
            rankings_by_model[name].append(ranking)
            t1 = time.perf_counter()
            verified = verify(net, heldout, ranking, batch_size=batch_size)
            vinfo = verified.info["verification"]
            correlations[name][m] = {"spearman": vinfo["spearman"], "energies": vinfo["energies"],
                                     "heldout_nll": [c.score for c in verified.candidates],
                                     "energy_ranks": vinfo["energy_ranks"]}
            by_removed = {c.removed: c.score for c in verified.candidates}
            seconds = round(build + time.perf_counter() - t1, 2)
            entries.append(StudyEntry(f"{name}:0", m, ranking.best, ranking, round(build, 2),
                                      heldout_nll=by_removed[ranking.best.removed]))
            entries.append(StudyEntry(f"{name}+verify", m, verified.best, verified, seconds,
                                      heldout_nll=verified.best.score))
            log.info("study: %s M = %d: ground state %s held-out NLL %.4f; verified pick %s (energy rank %d) "
                     "%.4f; Spearman %.2f", name, m, list(ranking.best.removed), by_removed[ranking.best.removed],
                     list(verified.best.removed), vinfo["energy_ranks"][0], verified.best.score, vinfo["spearman"])
            if name in refine:
                t2 = time.perf_counter()
                refined = refine_state(net, fit, heldout, verified,
                                       max_sweeps=max_sweeps, batch_size=batch_size)
                entries.append(StudyEntry(f"{name}+refine", m, refined.best, refined,
                                          round(seconds + time.perf_counter() - t2, 2), heldout_nll=refined.best.score))
                correlations[name][m]["refined"] = {
                    "removed": list(refined.best.removed), "heldout_nll": refined.best.score,
                    "energy": energy_model.energy(refined.best.removed) if energy_model is not None else None}
                log.info("study: %s M = %d refined to %s, held-out NLL %.4f (%d evaluations, accepted %s)", name,
                         m, list(refined.best.removed), refined.best.score, refined.info["refine"]["evaluations"],
                         refined.info["refine"]["accepted"])
        log.info("study: energy model %s built and verified in %.1f s", name, time.perf_counter() - t0)

    # 2. peers, on the same fitting part
    shared = _Shared(net, fit, batch_size)
    for method in peers:
        t0 = time.perf_counter()
        by_m = select(method, net, fit, remove, shared, batch_size=batch_size)
        seconds = round(time.perf_counter() - t0, 2)
        for m in remove:
            entries.append(StudyEntry(method, m, by_m[m].best, by_m[m], seconds))
        log.info("study: %s selected in %.1f s", method, seconds)
    order = [f"{e}{s}" for e in energies for s in (":0", "+verify", "+refine")] + list(peers)
    entries.sort(key=lambda e: (e.n_remove, order.index(e.method)))
    selection_seconds = round(time.perf_counter() - started, 2)

    # 3. evaluation of every distinct configuration
    t0 = time.perf_counter()
    ev = dict(limit=limit, ppl_limit=ppl_limit, batch_size=eval_batch_size, data_dir=data_dir,
              max_length=max_length, seed=seed, progress=progress)
    baseline = _evaluate(net, tokenizer, ppl_tasks, other_tasks, **ev)
    baseline["heldout_nll"] = calibration_nll(net, heldout, batch_size=batch_size)
    done: dict[tuple, StudyEntry] = {}
    for entry in entries:
        rule = entry.ranking.info.get("merge_rule", DEFAULT_MERGE_RULE)
        key = configuration_key(entry.candidate, rule)
        if key in done:
            first = done[key]
            entry.eval, entry.same_as = first.eval, first.method
            entry.heldout_nll = first.heldout_nll if entry.heldout_nll is None else entry.heldout_nll
            continue
        entry.eval, nll = evaluate_candidate(net, tokenizer, entry.candidate, rule, heldout, ppl_tasks, other_tasks,
                                             ev, batch_size=batch_size, with_nll=entry.heldout_nll is None)
        if entry.heldout_nll is None:
            entry.heldout_nll = nll
        done[key] = entry
        log.info("study: evaluated %s at M = %d: removed %s, held-out NLL %.4f, %s", entry.method, entry.n_remove,
                 list(entry.candidate.removed), entry.heldout_nll,
                 {t: round(v, 4) for t, v in _primary(entry.eval).items()})
    eval_seconds = round(time.perf_counter() - t0, 2)

    meta = {"model": model, "n_blocks": n_blocks, "block_kinds": kinds, "remove": remove, "energies": energies,
            "peers": peers, "k": k, "refine": refine, "max_sweeps": max_sweeps, "diverse": diverse, "pool": pool, "relin_step": relin_step,
            "exact_samples": exact_samples, "tasks": ppl_tasks + other_tasks, "ppl_tasks": ppl_tasks,
            "limit": limit, "ppl_limit": ppl_limit, "max_length": max_length, "fit": fit.describe(),
            "heldout": heldout.describe(), "batch_size": batch_size, "seed": seed, "device": dev, "dtype": dtype,
            "torch_threads": torch.get_num_threads(), "recommended": recommended_method(),
            "seconds": {"selection": selection_seconds, "evaluation": eval_seconds,
                        "total": round(time.perf_counter() - started, 2),
                        **{f"build {k_}": round(v, 2) for k_, v in costs.items()}}}
    result = StudyResult(out_dir, entries, baseline, correlations, meta)
    write_outputs(result, rankings_by_model)
    return result


# ----------------------------------------------------------------------------- tables

def _accuracy_tasks(result: StudyResult) -> list[str]:
    return [t for t in result.baseline["results"] if t not in result.meta["ppl_tasks"]]


def _primary(evaluation: dict) -> dict[str, float]:
    from cboprune.compare import primary_metric

    return {t: primary_metric(t, e)[1] for t, e in evaluation.get("results", {}).items()}


def _scores(result: StudyResult, evaluation: dict) -> tuple[dict[str, float], float | None]:
    """Primary metric per task and the mean over the accuracy tasks."""
    values = _primary(evaluation)
    accs = [values[t] for t in _accuracy_tasks(result) if t in values]
    return values, (sum(accs) / len(accs) if accs else None)


def _label(method: str) -> str:
    base = method.split(":")[0].split("+")[0]
    if base in ENERGY_NAMES:
        suffix = (" + verify" if "+verify" in method else " + verify + refine" if "+refine" in method
                  else " (ground state)")
        return f"CBO {base}{' (paper)' if base == 'fisher' else ''}{suffix}"
    from cboprune.compare import LABELS

    return LABELS.get(method, method)


def table_rows(result: StudyResult) -> tuple[list[str], list[list[str]]]:
    from cboprune.compare import primary_metric

    tasks = list(result.baseline["results"])
    header = ["M", "method", "removed", "held-out calib ppl"]
    header += [f"{t} ({primary_metric(t, result.baseline['results'][t])[0]})" for t in tasks]
    header += ["mean acc", "selection s"]
    rec = recommended_method()

    def cells(evaluation: dict, nll: float | None) -> list[str]:
        values, mean = _scores(result, evaluation)
        row = [f"{math.exp(nll):.2f}" if nll is not None else "—"]
        for t in tasks:
            v = values.get(t)
            row.append("—" if v is None else (f"{v:.2f}" if t in result.meta["ppl_tasks"] else f"{v:.4f}"))
        row.append("—" if mean is None else f"{mean:.4f}")
        return row

    rows = [["0", f"original ({result.meta['model']})", "", *cells(result.baseline, result.baseline["heldout_nll"]),
             "—"]]
    for e in result.entries:
        label = _label(e.method) + (" **[recommended]**" if e.method == rec else "")
        rows.append([str(e.n_remove), label + (f" (= {_label(e.same_as)})" if e.same_as else ""),
                     "[" + ", ".join(map(str, e.candidate.removed)) + "]", *cells(e.eval, e.heldout_nll),
                     f"{e.selection_seconds:.1f}"])
    return header, rows


def correlation_rows(result: StudyResult) -> tuple[list[str], list[list[str]]]:
    ms = result.meta["remove"]
    header = ["energy model", *[f"ρ at M={m}" for m in ms],
              *[f"verified pick's energy rank at M={m}" for m in ms]]
    rows = []
    for name, by_m in result.correlations.items():
        rho = [by_m[m]["spearman"] for m in ms]
        picks = [by_m[m]["energy_ranks"][0] for m in ms]
        rows.append([name, *["—" if math.isnan(r) else f"{r:+.2f}" for r in rho], *map(str, picks)])
    return header, rows


def _verdict(margin: float, ties_pass: bool = False) -> str:
    if margin == 0:
        return "yes (tie)" if ties_pass else "tie"
    return "yes" if margin > 0 else "no"


def verdict_rows(result: StudyResult) -> tuple[list[str], list[list[str]]]:
    """The recommended approach against the best peer on each criterion, per M."""
    rec = recommended_method()
    ppl_task = result.meta["ppl_tasks"][0] if result.meta["ppl_tasks"] else None
    header = ["M", "recommended", f"best peer ({ppl_task or 'ppl'})", "ppl: beats every peer",
              "mean acc (recommended)", "best peer (mean acc)", "acc: >= best peer"]
    rows = []
    for m in result.meta["remove"]:
        mine = next((e for e in result.entries if e.n_remove == m and e.method == rec), None)
        peers = [e for e in result.entries if e.n_remove == m and e.kind == "peer"]
        if mine is None or not peers:
            continue
        vals, mean = _scores(result, mine.eval)
        peer_scores = [(e, *_scores(result, e.eval)) for e in peers]
        row = [str(m), f"{vals.get(ppl_task, float('nan')):.2f}" if ppl_task else "—"]
        if ppl_task:
            best = min(peer_scores, key=lambda t: t[1].get(ppl_task, math.inf))
            bv = best[1].get(ppl_task, math.nan)
            mv = vals.get(ppl_task, math.nan)
            row += [f"{_label(best[0].method)} {bv:.2f}", f"{_verdict(bv - mv)} ({(mv / bv - 1) * 100:+.1f}%)"]
        else:
            row += ["—", "—"]
        accs = [t for t in peer_scores if t[2] is not None]
        if mean is not None and accs:
            best = max(accs, key=lambda t: t[2])
            row += [f"{mean:.4f}", f"{_label(best[0].method)} {best[2]:.4f}",
                    f"{_verdict(mean - best[2], ties_pass=True)} ({(mean - best[2]) * 100:+.2f} points)"]
        else:
            row += ["—", "—", "—"]
        rows.append(row)
    return header, rows


# ----------------------------------------------------------------------------- figures

def plot_energy_vs_loss(result: StudyResult, path: Path) -> Path:
    """Energy (x) against held-out calibration NLL (y) of each verified state: rows M, columns models."""
    from cboprune.report.plots import _pyplot

    plt = _pyplot()
    names = list(result.correlations)
    ms = result.meta["remove"]
    fig, axes = plt.subplots(len(ms), len(names), figsize=(3.2 * len(names) + 0.5, 2.6 * len(ms) + 0.4),
                             squeeze=False)
    for r, m in enumerate(ms):
        for c, name in enumerate(names):
            ax = axes[r, c]
            d = result.correlations[name][m]
            ax.scatter(d["energies"], d["heldout_nll"], s=14, c="C0")
            if d["energies"]:
                ax.scatter([d["energies"][0]], [d["heldout_nll"][0]], s=40, c="C3", label="verified pick")
            refined = d.get("refined")
            if refined and refined["energy"] is not None:
                ax.scatter([refined["energy"]], [refined["heldout_nll"]], s=40, c="C2", marker="*",
                           label="refined")
                ax.legend(fontsize=6)
            peers = [e.heldout_nll for e in result.entries if e.n_remove == m and e.kind == "peer"
                     and e.heldout_nll is not None]
            if peers:
                ax.axhline(min(peers), color="grey", ls="--", lw=0.8, label="best peer")
            rho = d["spearman"]
            ax.set_title(f"{name}, M={m}, ρ={'—' if math.isnan(rho) else f'{rho:+.2f}'}", fontsize=8)
            ax.tick_params(labelsize=7)
            if c == 0:
                ax.set_ylabel("held-out NLL", fontsize=8)
            if r == len(ms) - 1:
                ax.set_xlabel("energy", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: StudyResult, rankings_by_model: dict[str, list]) -> dict[str, Path]:
    from cboprune.compare import _csv, _markdown
    from cboprune.report.plots import plot_removal_frequency

    out = result.output_dir
    out.mkdir(parents=True, exist_ok=True)
    h1, r1 = table_rows(result)
    h2, r2 = correlation_rows(result)
    h3, r3 = verdict_rows(result)
    paths = {"md": out / "study.md", "csv": out / "study.csv", "json": out / "results.json"}
    if result.correlations:
        paths["scatter"] = plot_energy_vs_loss(result, out / "energy_vs_loss.png")
    for name, rankings in rankings_by_model.items():
        paths[f"frequency_{name}"] = plot_removal_frequency(rankings, out / f"frequency_{name}.png",
                                                            result.meta["block_kinds"])
    meta = result.meta
    secs = meta["seconds"]
    text = [f"# Study: {meta['model']} (N = {meta['n_blocks']}), M = {meta['remove']}\n",
            f"Fitting data {meta['fit']['source']}: {meta['fit']['n_samples']} samples, {meta['fit']['n_tokens']} "
            f"tokens; held-out {meta['heldout']['n_samples']} samples, {meta['heldout']['n_tokens']} tokens. "
            f"K = {meta['k']} states verified per model and M"
            + (f" (diverse: Jaccard <= {meta['diverse']})" if meta["diverse"] is not None else "")
            + f". Tasks limited to {meta['limit'] or 'all'} items"
            + (f", perplexity to {meta['ppl_limit']} documents" if meta["ppl_tasks"] else "")
            + f"; no retraining. Device {meta['device']} ({meta['torch_threads']} threads), {meta['dtype']}. "
            f"Time: selection {secs['selection']} s, evaluation {secs['evaluation']} s, total {secs['total']} s.\n",
            "## Every configuration\n", _markdown(h1, r1),
            "Perplexity columns: lower is better; accuracy: acc_norm where the task reports it, else acc; "
            "mean acc is over the accuracy tasks.\n",
            "## Energy against held-out loss (Spearman ρ over the K verified states)\n", _markdown(h2, r2),
            f"## The recommended approach ({_label(meta['recommended'])}) against the peers\n",
            _markdown(h3, r3) if r3 else "(the recommended approach or the peers were not part of this study)\n",
            "## Figures\n", *[f"![{p.stem}]({p.name})\n" for key, p in paths.items() if p.suffix == ".png"]]
    paths["md"].write_text("\n".join(text), encoding="utf-8")
    _csv(paths["csv"], h1, r1)
    data = {"meta": meta, "baseline": result.baseline, "correlations": {n: {str(m): v for m, v in d.items()}
                                                                          for n, d in result.correlations.items()},
            "entries": [{"method": e.method, "n_remove": e.n_remove, "candidate": e.candidate.to_dict(),
                         "ranking": e.ranking.to_dict(), "selection_seconds": e.selection_seconds,
                         "heldout_nll": e.heldout_nll, "same_as": e.same_as, "eval": e.eval} for e in result.entries]}
    paths["json"].write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- CLI

def add_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="hub id, checkpoint directory, .gguf file or 'default'")
    p.add_argument("--data", help="calibration file or hub dataset; split into fitting and held-out samples "
                                  "(default: model-generated)")
    p.add_argument("--n-samples", type=int, default=64, help="fitting samples (default 64)")
    p.add_argument("--n-heldout", type=int, default=32, help="held-out samples for verification (default 32)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--remove", type=int, nargs="+", default=[4, 8, 12], metavar="M")
    p.add_argument("--energies", default=DEFAULT_ENERGIES, help=f"energy models (default: {DEFAULT_ENERGIES})")
    p.add_argument("--peers", default=DEFAULT_PEERS, help=f"peer criteria (default: {DEFAULT_PEERS}; '' for none)")
    p.add_argument("-k", "--k", type=int, default=10, help="lowest states verified per model and M (default 10)")
    p.add_argument("--refine", default="measured", help="energy models whose verified pick is refined by swap "
                                                         "search on the real loss (default: measured; '' for none)")
    p.add_argument("--max-sweeps", type=int, default=8, help="swap-search sweeps at most (default 8)")
    p.add_argument("--diverse", type=float, help="verify structurally diverse states: Jaccard similarity at most this")
    p.add_argument("--pool", type=int, help="measured model: pairs only among the P blocks cheapest to remove alone")
    p.add_argument("--relin-step", type=int, default=4, help="re-linearize after this many removals (default 4)")
    p.add_argument("--exact-samples", type=int, help="fitting samples for the exact Hessian (N HVPs each)")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--limit", type=int, help="first N items of each accuracy task")
    p.add_argument("--ppl-limit", type=int, help="documents for perplexity tasks (default: --limit)")
    p.add_argument("--max-length", type=int, help="evaluation context window (default: the model's, at most 2048)")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--data-dir", help="folder holding eval/ (default: $CBOPRUNE_DATA_DIR, then ../shared/data)")
    p.add_argument("--solver-time-limit", type=float, help="solver seconds per model and M")
    p.add_argument("--output-dir", default="outputs/study")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--dtype", default="float32")


def run_study_command(args: argparse.Namespace) -> int:
    result = run_study(model=args.model, data=args.data, n_samples=args.n_samples, n_heldout=args.n_heldout,
                       seq_len=args.seq_len, batch_size=args.batch_size, remove=args.remove, energies=args.energies,
                       peers=args.peers, k=args.k, refine=args.refine, max_sweeps=args.max_sweeps, diverse=args.diverse, pool=args.pool, relin_step=args.relin_step,
                       exact_samples=args.exact_samples, tasks=args.tasks, limit=args.limit,
                       ppl_limit=args.ppl_limit, eval_batch_size=args.eval_batch_size, data_dir=args.data_dir,
                       max_length=args.max_length, output_dir=args.output_dir, overwrite=args.overwrite,
                       solver_time_limit=args.solver_time_limit, seed=args.seed, device=args.device,
                       dtype=args.dtype, progress=not getattr(args, "quiet", False))
    print((result.output_dir / "study.md").read_text(encoding="utf-8"))
    print(f"wrote {result.output_dir}")
    return 0
