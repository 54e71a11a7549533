"""`cboprune study --calibrations ...`: which matters more, the calibration or the search?

    cboprune study --config configs/study-domains.yaml

The whole study (`cboprune.workflows.study.run_study`) runs once per calibration (a file, `generated`, or a
mix `a.json:0.5,c4.jsonl:0.5`) and once per heal seed (`--heal-seeds 0 1`), every cell healed with
one recipe on one heal data file (`--heal-data`, the same for every calibration) and scored on the
same held-out domains (`--domains`). Then one table: calibration x method x domain after healing,
the mean of the heal seeds with their spread, and a variance split: how far the results move when
the calibration changes (method fixed) against when the method changes (calibration fixed).

Each study keeps its finished steps in `<output-dir>.runs/<calibration>.heal-cache`, so the whole
command resumes where it stopped; the seeds are the outer loop (every calibration gets its first
seed before any gets its second), and `<output-dir>.runs/progress.md` is rewritten after every study,
so a long run can be read while it goes. Selections and pre-heal evaluations are shared by the seeds
(they do not depend on the heal seed).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

from cboprune.data.mix import is_mix, parse_mix
from cboprune.evaluation.domains import (
    HEADLINE,
    headline,
    paired_difference,
    text_loss_summary,
)
from cboprune.core.methods import entry_label
from cboprune.core.outputs import check_output_dir, staged_dir, staged_file
from cboprune.report.tables import markdown_table

log = logging.getLogger(__name__)


def slug(spec: str | None) -> str:
    """A directory name for a calibration spec: `alpaca_en_demo`, `generated`, `mix-alpaca_en_demo-50-c4_demo-50`."""

    if not spec or spec in ("generated", "builtin"):
        return "generated"
    if is_mix(spec):
        return "mix-" + "-".join(f"{s.name}-{round(100 * s.weight)}" for s in parse_mix(spec))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(spec).stem)


@dataclass
class Cell:
    calibration: str
    seed: int
    method: str
    label: str
    n_remove: int
    removed: list[int]
    before: dict[str, Any] | None  # domains before healing
    after: dict[int, dict[str, Any] | None]  # steps -> domains after healing
    default: bool


def collect(study, calibration: str, seed: int) -> list[Cell]:
    """The cells of one finished study (every distinct configuration, named by its method)."""

    rec = study.meta["recommended"]
    steps = (study.meta.get("healing") or {}).get("steps") or []
    cells = []
    for e in study.entries:
        if e.same_as is not None and e.method != rec:
            continue
        source = e
        if e.same_as is not None:  # the recommended pick equals another row's: its results are that row's
            source = next(x for x in study.entries if x.method == e.same_as and x.n_remove == e.n_remove)
        cells.append(Cell(calibration, seed, e.method, entry_label(e.method), e.n_remove, list(e.candidate.removed),
                          source.eval.get("domains"),
                          {s: (source.healed.get(s) or {}).get("eval", {}).get("domains") for s in steps},
                          e.method == rec))
    return cells


def _value(domains: dict[str, Any] | None, name: str) -> float | None:
    if not domains or name not in domains:
        return None
    return headline(domains[name])[1]


def _mean_text(domains: dict[str, Any] | None) -> float | None:
    return text_loss_summary(domains or {})[0]


def cross_tables(cells: list[Cell], steps: list[int]) -> str:
    """Per M and heal budget: rows calibration x method, one column per domain (the mean over heal
    seeds, Δ = the spread between them), then the verdict and the variance split."""

    names: list[str] = []
    kinds: dict[str, str] = {}
    for c in cells:
        for d in (c.before, *c.after.values()):
            for n, e in (d or {}).items():
                if n not in names:
                    names.append(n)
                    kinds[n] = e["kind"]
    text = []
    for m in sorted({c.n_remove for c in cells}):
        for s in steps:
            groups: dict[tuple[str, str], list[Cell]] = {}
            for c in cells:
                if c.n_remove == m:
                    groups.setdefault((c.calibration, c.method), []).append(c)
            header = ["calibration", "method", "removed", "seeds", *[f"{n} ({HEADLINE[kinds[n]][0]})" for n in names],
                      "mean text loss"]
            rows, summary = [], {}
            for (cal, method), group in groups.items():
                per_name = {}
                for n in [*names, "_mean"]:
                    vals = [(_mean_text(g.after.get(s)) if n == "_mean" else _value(g.after.get(s), n)) for g in group]
                    vals = [v for v in vals if v is not None]
                    per_name[n] = (sum(vals) / len(vals), max(vals) - min(vals), len(vals)) if vals else None
                seeds = sorted({g.seed for g in group if g.after.get(s)})
                if not seeds:
                    continue
                summary[(cal, method)] = (group[0], per_name)

                def fmt(v):
                    return "—" if v is None else f"{v[0]:.3f}" + (f" (Δ{v[1]:.3f})" if v[2] > 1 else "")

                rows.append([slug(cal), group[0].label + (" **[default]**" if group[0].default else ""),
                             "[" + ", ".join(map(str, group[0].removed)) + "]", ",".join(map(str, seeds)),
                             *[fmt(per_name[n]) for n in names], fmt(per_name["_mean"])])
            if not rows:
                continue
            text += [f"### M = {m}, after {s} healing steps\n", markdown_table(header, rows)]
            text += _verdict(summary, names, kinds)
            text += _variance_split(summary)
    return "\n".join(text) if text else "(no healed cell finished yet)\n"


def _verdict(summary, names, kinds) -> list[str]:
    """Per calibration: does the default beat the best other method on every domain (a difference
    counts only beyond the larger of the two seed spreads)?"""

    lines = []
    for cal in dict.fromkeys(c for c, _ in summary):
        mine = next(((c0, v) for (c, _), (c0, v) in summary.items() if c == cal and c0.default), None)
        if mine is None:
            continue
        others = [(c0, v) for (c, _), (c0, v) in summary.items() if c == cal and not c0.default
                  and c0.removed != mine[0].removed]
        if not others:
            continue
        losses, wins = [], 0
        for n in [*names, "_mean"]:
            lower = True if n == "_mean" else HEADLINE[kinds[n]][1]
            if mine[1].get(n) is None:
                continue
            scored = [(o, v[n]) for o, v in others if v.get(n) is not None]
            if not scored:
                continue
            best_o, best = min(scored, key=lambda t: t[1][0] if lower else -t[1][0])
            diff = (mine[1][n][0] - best[0]) * (1 if lower else -1)  # > 0: the default is worse
            noise = max(mine[1][n][1], best[1])
            if diff > noise:
                paired = _paired(mine[0], best_o, n)
                losses.append(f"{'mean text loss' if n == '_mean' else n} ({best_o.label} by {diff:.3f}, "
                              f"seed spread {noise:.3f}{paired})")
            elif diff < -noise:
                wins += 1
        lines.append(f"- {slug(cal)}: the default is beaten beyond the seed spread on "
                     + (", ".join(losses) if losses else "no domain") + f"; better beyond it on {wins}.\n")
    return ["Verdict (the default against the best other method of the same calibration):\n", *lines] if lines else []


def _paired(a: Cell, b: Cell, name: str) -> str:
    """', paired standard error x' of the first seed's difference on the same items, when known."""

    step = next(iter(a.after), None)
    da, db = (a.after.get(step) or {}).get(name), (b.after.get(step) or {}).get(name)
    if da is None or db is None:
        return ""
    _, se = paired_difference(da, db)
    return "" if se is None else f", paired standard error {se:.3f}"


def _variance_split(summary) -> list[str]:
    """How much the mean text loss moves with the calibration (method fixed) and with the method
    (calibration fixed): the mean range over the other axis."""
    table: dict[tuple[str, str], float] = {}
    for (cal, _), (c0, v) in summary.items():
        if v.get("_mean") is not None:
            table[(cal, "default" if c0.default else c0.method)] = v["_mean"][0]
    cals = sorted({c for c, _ in table})
    methods = sorted({m for _, m in table})

    def mean_range(groups):
        ranges = [max(g) - min(g) for g in groups if len(g) > 1]
        return (sum(ranges) / len(ranges), len(ranges)) if ranges else (None, 0)

    by_cal, n_cal = mean_range([[table[(c, m)] for c in cals if (c, m) in table] for m in methods])
    by_method, n_m = mean_range([[table[(c, m)] for m in methods if (c, m) in table] for c in cals])
    if by_cal is None and by_method is None:
        return []
    fmt = lambda x: "—" if x is None else f"{x:.3f}"  # noqa: E731
    return [f"Calibration or search? Mean text loss moves by {fmt(by_cal)} nats across calibrations with the "
            f"method fixed (mean range over {n_cal} methods) and by {fmt(by_method)} across methods with the "
            f"calibration fixed (over {n_m} calibrations).\n"]


def run_domain_study(cfg, run_study: Callable[..., Any], *, progress: bool = True) -> Path:
    """Every calibration of `cfg.calibrations` x every heal seed: one study each (`run_study(cfg,
    progress=)`, `cboprune.workflows.study.run_study`, which calls this module), then the table."""

    out = check_output_dir(cfg.output_dir, cfg.overwrite)
    runs = out.with_name(out.name + ".runs")
    seeds = list(cfg.heal_seeds or [cfg.seed])
    steps = sorted(set(cfg.heal_steps or []))
    cells: list[Cell] = []
    seconds: dict[str, float] = {}
    for seed in seeds:  # every calibration gets its first seed before any gets its second
        for calibration in cfg.calibrations:
            data = None if calibration in ("generated", "builtin") else calibration
            sub = replace(cfg, data=data, calibrations=None, heal_seeds=[seed],
                          output_dir=str(runs / slug(calibration)), overwrite=True)
            log.info("domain study: calibration %s, heal seed %d", calibration, seed)
            study = run_study(sub, progress=progress)
            cells += collect(study, calibration, seed)
            seconds[f"{slug(calibration)} seed {seed}"] = study.meta["seconds"]["total"]
            with staged_file(runs / "progress.md") as stage:
                stage.write_text(_page(cfg, cells, steps, seconds, done=False), encoding="utf-8")
    with staged_dir(out, overwrite=cfg.overwrite) as stage:
        (stage / "domains.md").write_text(_page(cfg, cells, steps, seconds, done=True), encoding="utf-8")
        (stage / "domains.json").write_text(json.dumps(
            {"calibrations": cfg.calibrations, "heal_seeds": seeds, "steps": steps, "seconds": seconds,
             "cells": [c.__dict__ for c in cells]}, indent=2, default=str) + "\n", encoding="utf-8")
    return out


def _page(cfg, cells: list[Cell], steps: list[int], seconds: dict[str, float], *, done: bool) -> str:
    head = [f"# Calibration x method x domain: {cfg.model}, M = {cfg.remove}\n",
            f"Calibrations {cfg.calibrations}; {cfg.n_samples} fitting + {cfg.heldout_samples} held-out samples of "
            f"≤ {cfg.seq_len} tokens; heal data {cfg.heal_data or cfg.data}, {steps} steps, lr {cfg.heal_lr}, "
            f"{cfg.heal_global_batch_size} x {cfg.heal_seq_len or cfg.seq_len} tokens a step, heal seeds "
            f"{cfg.heal_seeds or [cfg.seed]}; domains {cfg.domains}, {cfg.domain_limit} items each. Cells: the "
            "mean over heal seeds, Δ = max − min over them. Text domains: per-token NLL (lower is better); "
            "benchmarks: gold-answer log-likelihood (higher is better). Standard errors over items: each "
            "study's study.md.\n",
            "Wall time per study (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + ".\n"]
    if not done:
        head.append("**In progress**: the studies not listed above have not finished.\n")
    return "\n".join(head) + "\n" + cross_tables(cells, steps)
