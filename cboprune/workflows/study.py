"""`cboprune study`: how well does each energy model predict real quality, and which choice wins?

    cboprune study --remove 4 8 12 --data ../shared/data/calib/alpaca_en_demo.json --limit 100

For one model and several M, on one calibration set split into a fitting part and a held-out part:

1. every energy model (`cboprune.selection.energy`) is built on the fitting part and its K lowest states are
   listed; each state's real loss is measured on the held-out part (`cboprune.selection.verify`), giving the
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
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cboprune.core import methods as registry
from cboprune.energies.hybrid import single_fraction
from cboprune.selection.energy import RECOMMENDED
from cboprune.engine.skeleton import start_experiment
from cboprune.evaluation.domains import domain_markdown
from cboprune.evaluation.metrics import mean_accuracy, primary_metric, primary_scores
from cboprune.engine.experiment import (
    EnergyResult,
    cost_of,
    energy_entries,
    entry_dict,
    peer_entries,
)
from cboprune.core.config import config_from_args
from cboprune.core.finite import metric_cell, metric_key
from cboprune.workflows.domain_study import run_domain_study
from cboprune.engine.healing_study import healing_markdown
from cboprune.engine.judge import judge_by_healing
from cboprune.core.methods import entry_label
from cboprune.core.outputs import dumps_strict
from cboprune.core.ranking import Entry, Ranking
from cboprune.engine.repair_comparison import repair_markdown
from cboprune.report.plots import _pyplot, plot_removal_frequency
from cboprune.report.tables import markdown_table, write_csv
from cboprune.engine.resume import entries_from_state, entries_state
from cboprune.selection.verify import measured_nll

# Imported when the CLI parser is built: torch, the solvers and the baselines load lazily.
log = logging.getLogger(__name__)


def kind_of(entry: Entry) -> str:
    return registry.get(entry.base).kind


@dataclass
class StudyResult:
    output_dir: Path
    entries: list[Entry]
    baseline: dict[str, Any]
    correlations: dict[str, dict[int, dict[str, Any]]]  # model -> M -> {spearman, energies, nll, ...}
    meta: dict[str, Any]


def recommended_method(judged: bool = False) -> str:
    """The entry name of `run`'s default selection (`judged`: the short-heal judge ran)."""
    r = RECOMMENDED
    if judged:
        return f"{r.energy}+judge"
    return f"{r.energy}+refine" if r.refine_sweeps else f"{r.energy}+verify" if r.verify else f"{r.energy}:0"


def _judge(cfg, session, energy_entries: list[Entry], out_dir: Path, candidates: int) -> tuple[list[Entry], str]:
    """`run`'s judge on the verified rankings: one '+judge' entry per M, charged the verification's
    seconds and the judge's heals."""
    import shutil


    verified = {e.n_remove: e for e in energy_entries if e.method.endswith("+verify")}
    work = out_dir.with_name(out_dir.name + ".judge-work")
    try:
        rankings, section, _ = judge_by_healing(cfg, session, [verified[m].ranking for m in sorted(verified)],
                                                work, candidates)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = verified[min(verified)].method.replace("+verify", "+judge")
    judged = [Entry(name, r.n_remove, r.best, r, round(verified[r.n_remove].selection_seconds
                                                        + r.info["heal_judge"]["seconds"], 2), nll=measured_nll(r)[0])
              for r in rankings]
    return judged, section.replace("## Chosen after a short heal", "## The short-heal judge (`run`'s default)")


def heal_order(entries: list[Entry]) -> list[Entry]:
    """The table's configurations first, then the extra low-energy states of --heal-states rank by
    rank across M and energy models: a study stopped part-way has every group equally far along."""
    def extra_rank(e: Entry) -> int:
        rank = e.method.partition(":")[2]
        return int(rank) if rank.isdigit() else 0

    return sorted(entries, key=extra_rank)  # stable: the table's order within a rank


def _energy_state(result) -> dict[str, Any]:
    return {"entries": entries_state(result.entries), "seconds": result.seconds,
            "rankings": [[m, r.to_dict()] for m, r in result.rankings.items()],
            "correlations": [[m, c] for m, c in result.correlations.items()]}


def _energy_result(state: dict[str, Any], remove: list[int]):
    """An energy model's kept result (raises on anything of another shape)."""

    result = EnergyResult(entries_from_state(state["entries"]),
                          {int(m): Ranking.from_dict(r) for m, r in state["rankings"]},
                          {int(m): dict(c) for m, c in state["correlations"]}, float(state["seconds"]))
    for m in remove:
        c = result.correlations[m]
        if not (len(c["energies"]) == len(c["heldout_nll"]) == len(c["energy_ranks"]) and result.rankings[m].candidates):
            raise ValueError(f"M = {m}: inconsistent verification")
    return result


def run_study(cfg, *, progress: bool = True) -> StudyResult:
    """Every energy model's K lowest states verified on held-out samples, every peer on the same
    fitting samples, every distinct configuration evaluated once. `cfg`: a `Config` for "study"."""
    energies = registry.parse_names(cfg.energies, registry.ENERGY)
    refine = [r for r in registry.parse_names(cfg.refine, registry.ENERGY, allow_empty=True) if r in energies]
    peers = registry.parse_names(cfg.peers, registry.PEER, allow_empty=True)
    run = start_experiment(cfg, "study", heldout=cfg.heldout_samples, min_kept=2, progress=progress,
                           options={"pool": cfg.pool, "relin_step": cfg.relin_step,
                                    "single_samples": cfg.single_samples, "run_cost": cfg.run_cost, "recentre": cfg.recentre,
                                    "exact_samples": cfg.exact_samples})
    session, context = run.session, run.context
    fit, heldout = session.fit, session.heldout
    # With --heal-candidates, `run` judges the recommended model's best verified states by a short heal;
    # the study shows that pick, at its cost, as '<energy>+judge'.
    candidates = cfg.heal_candidates if RECOMMENDED.energy in energies else 0
    judge_section = None
    log.info("study: %s (N = %d), fitting %s, held-out %s, energy models %s, peers %s, M = %s", cfg.model,
             session.n_blocks, fit.describe(), heldout.n_samples, energies, peers, cfg.remove)

    # 1. energy models -> K lowest states -> verified on the held-out part
    entries: list[Entry] = []
    correlations: dict[str, dict[int, dict[str, Any]]] = {}
    rankings_by_model: dict[str, list] = {}
    done = {name: run.kept("energy", name, lambda v: _energy_result(v, cfg.remove)) for name in energies}
    t0 = time.perf_counter()
    if any(done[e] is None and "gradients" in registry.get(e).needs and e != "exact" for e in energies):
        context.hessian()  # shared by the gradient-based models (exact makes its own)
    costs = {"gate gradients": time.perf_counter() - t0}

    def energy(name: str):
        result = energy_entries(name, context, cfg.remove, k=cfg.top, verify=True, diverse=cfg.diverse,
                                refine_sweeps=cfg.refine_sweeps if name in refine else 0)
        return result, _energy_state(result)

    for name in energies:
        result = done[name] or run.step("energy", name, lambda v: _energy_result(v, cfg.remove),
                                        lambda: energy(name))
        entries += result.entries
        for m, ranking in result.rankings.items():  # more low-energy states, healed for ρ(energy, post-heal)
            entries += [Entry(f"{name}:{r}", m, c, ranking, result.entries[0].selection_seconds)
                        for r, c in enumerate(ranking.candidates[:cfg.heal_states]) if r > 0]
        correlations[name] = result.correlations
        rankings_by_model[name] = [result.rankings[m] for m in cfg.remove]
        costs[name] = result.seconds
        log.info("study: energy model %s built and verified in %.1f s", name, result.seconds)
        if name == RECOMMENDED.energy and candidates:
            def judge(result=result):
                judged, section = _judge(cfg, session, result.entries, run.out_dir, candidates)
                return (judged, section), {"entries": entries_state(judged), "section": section}

            judged, judge_section = run.step("judge", name, lambda v: (entries_from_state(v["entries"]),
                                                                       str(v["section"])), judge)
            entries += judged
            costs["judge"] = sum(e.ranking.info["heal_judge"]["seconds"] for e in judged)

    # 2. peers, on the same fitting part
    for method in peers:
        entries += run.step("peer", method, lambda v: entries_from_state(v["entries"]),
                            lambda method=method: _peer_step(method, context, cfg.remove))
    order = [f"{e}{s}" for e in energies for s in (":0", "+verify", "+judge", "+refine")] + list(peers)
    entries.sort(key=lambda e: (e.n_remove, order.index(e.method) if e.method in order
                                else order.index(f"{e.base}+refine") + int(e.method.split(":")[1]) / 1e3))

    # 3. evaluation of every distinct configuration, then the heals
    opts = {"pool": cfg.pool, "relin_step": cfg.relin_step,
            "single_fraction": single_fraction(fit.n_samples, cfg.single_samples)}
    baseline = run.evaluate(entries, nll_samples=heldout, key="heldout_nll",
                            cost=lambda e: cost_of(e, session.n_blocks, fit_tokens=fit.n_tokens,
                                                   heldout_tokens=heldout.n_tokens, options=opts))
    run.heal(heal_order(entries), nll_samples=heldout)
    meta = {**run.meta(), "block_kinds": session.block_kinds, "energies": energies, "peers": peers, "k": cfg.top,
            "refine": refine, "max_sweeps": cfg.refine_sweeps, "diverse": cfg.diverse, "pool": cfg.pool,
            "relin_step": cfg.relin_step, "exact_samples": cfg.exact_samples, "fit": fit.describe(),
            "heldout": heldout.describe(), "recommended": recommended_method(judged=judge_section is not None),
            "judge": judge_section, "heal_states": cfg.heal_states,
            "seconds": {**run.timings(), **{f"build {k_}": round(v, 2) for k_, v in costs.items()}}}
    result = StudyResult(run.out_dir, entries, baseline, correlations, meta)
    run.write(lambda stage: write_outputs(result, rankings_by_model, stage))
    return result


def _peer_step(method: str, context, remove):
    selected = peer_entries(method, context, remove)
    return selected, {"entries": entries_state(selected)}


# ----------------------------------------------------------------------------- tables

def _accuracy_tasks(result: StudyResult) -> list[str]:
    return [t for t in result.baseline["results"] if t not in result.meta["ppl_tasks"]]


def _scores(result: StudyResult, evaluation: dict) -> tuple[dict[str, float], float | None]:
    """Primary metric per task and the mean over the accuracy tasks."""
    return primary_scores(evaluation), mean_accuracy(evaluation, _accuracy_tasks(result))


def _exp(nll: float | None) -> float | None:
    """Perplexity from a mean NLL; a diverged NLL stays diverged (inf), never an overflow error."""
    return None if nll is None else (math.exp(nll) if nll < 700 else math.inf)


def table_rows(result: StudyResult) -> tuple[list[str], list[list[str]]]:
    tasks = list(result.baseline["results"])
    header = ["M", "method", "removed", "held-out calib ppl"]
    header += [f"{t} ({primary_metric(t, result.baseline['results'][t])[0]})" for t in tasks]
    header += ["mean acc", "cost (fwd passes)", "selection s"]
    rec = result.meta["recommended"]

    def cells(evaluation: dict, nll: float | None) -> list[str]:
        values, mean = _scores(result, evaluation)
        row = [metric_cell(_exp(nll), ".2f")]
        for t in tasks:
            v = values.get(t)
            row.append(metric_cell(v, ".2f" if t in result.meta["ppl_tasks"] else ".4f"))
        row.append(metric_cell(mean))
        return row

    rows = [["0", f"original ({result.meta['model']})", "", *cells(result.baseline, result.baseline["heldout_nll"]),
             "—", "—"]]
    for e in result.entries:
        label = entry_label(e.method) + (" **[recommended]**" if e.method == rec else "")
        rows.append([str(e.n_remove), label + (f" (= {entry_label(e.same_as)})" if e.same_as else ""),
                     "[" + ", ".join(map(str, e.candidate.removed)) + "]", *cells(e.eval, e.nll),
                     "—" if e.cost is None else f"{e.cost:.4g}", f"{e.selection_seconds:.1f}"])
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
    rec = result.meta["recommended"]
    ppl_task = result.meta["ppl_tasks"][0] if result.meta["ppl_tasks"] else None
    header = ["M", "recommended", f"best peer ({ppl_task or 'ppl'})", "ppl: beats every peer",
              "mean acc (recommended)", "best peer (mean acc)", "acc: >= best peer"]
    rows = []
    for m in result.meta["remove"]:
        mine = next((e for e in result.entries if e.n_remove == m and e.method == rec), None)
        peers = [e for e in result.entries if e.n_remove == m and kind_of(e) == registry.PEER]
        if mine is None or not peers:
            continue
        vals, mean = _scores(result, mine.eval)
        peer_scores = [(e, *_scores(result, e.eval)) for e in peers]
        row = [str(m), f"{vals.get(ppl_task, float('nan')):.2f}" if ppl_task else "—"]
        if ppl_task:
            best = min(peer_scores, key=lambda t: metric_key(t[1].get(ppl_task)))
            bv = best[1].get(ppl_task, math.nan)
            mv = vals.get(ppl_task, math.nan)
            row += [f"{entry_label(best[0].method)} {bv:.2f}", f"{_verdict(bv - mv)} ({(mv / bv - 1) * 100:+.1f}%)"]
        else:
            row += ["—", "—"]
        accs = [t for t in peer_scores if t[2] is not None]
        if mean is not None and accs:
            best = max(accs, key=lambda t: t[2])
            row += [f"{mean:.4f}", f"{entry_label(best[0].method)} {best[2]:.4f}",
                    f"{_verdict(mean - best[2], ties_pass=True)} ({(mean - best[2]) * 100:+.2f} points)"]
        else:
            row += ["—", "—", "—"]
        rows.append(row)
    return header, rows


# ----------------------------------------------------------------------------- figures

def plot_energy_vs_loss(result: StudyResult, path: Path) -> Path:
    """Energy (x) against held-out calibration NLL (y) of each verified state: rows M, columns models."""

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
            peers = [e.nll for e in result.entries if e.n_remove == m and kind_of(e) == registry.PEER
                     and e.nll is not None]
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


def write_outputs(result: StudyResult, rankings_by_model: dict[str, list],
                  directory: Path | None = None) -> dict[str, Path]:
    out = Path(directory or result.output_dir)
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
            "## Every configuration\n", markdown_table(h1, r1),
            "Perplexity columns: lower is better; accuracy: acc_norm where the task reports it, else acc; "
            "mean acc is over the accuracy tasks.\n",
            "## Energy against held-out loss (Spearman ρ over the K verified states)\n", markdown_table(h2, r2),
            f"## The recommended approach ({entry_label(meta['recommended'])}) against the peers\n",
            markdown_table(h3, r3) if r3 else "(the recommended approach or the peers were not part of this study)\n",
            *([meta["judge"] + "\n"] if meta.get("judge") else []),
            "## Figures\n", *[f"![{p.stem}]({p.name})\n" for key, p in paths.items() if p.suffix == ".png"]]
    if meta.get("repair"):
        paths["repair_md"] = out / "repair.md"
        paths["repair_md"].write_text(repair_markdown(result.entries, meta, entry_label), encoding="utf-8")
    if result.baseline.get("domains"):
        text.insert(-1, domain_markdown(result.entries, result.baseline, entry_label,
                                        (meta.get("healing") or {}).get("steps")))
    if meta.get("healing"):
        paths["healing_md"] = out / "healing.md"
        paths["healing_md"].write_text(healing_markdown(result.entries, meta, entry_label), encoding="utf-8")
        text.insert(-1, "## After healing\n\nSee [healing.md](healing.md).\n")
    paths["md"].write_text("\n".join(text), encoding="utf-8")
    write_csv(paths["csv"], h1, r1)
    data = {"meta": meta, "baseline": result.baseline, "correlations": {n: {str(m): v for m, v in d.items()}
                                                                          for n, d in result.correlations.items()},
            "entries": [entry_dict(e, "heldout_nll") for e in result.entries]}
    paths["json"].write_text(dumps_strict(data, indent=2, default=str) + "\n", encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- CLI


def run_study_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, "study")
    if cfg.calibrations:  # the calibration axis: one study per calibration and heal seed, one table
        out = run_domain_study(cfg, run_study, progress=not getattr(args, "quiet", False))
        print((out / "domains.md").read_text(encoding="utf-8"))
        print(f"wrote {out}")
        return 0
    result = run_study(cfg, progress=not getattr(args, "quiet", False))
    print((result.output_dir / "study.md").read_text(encoding="utf-8"))
    print(f"wrote {result.output_dir}")
    return 0
