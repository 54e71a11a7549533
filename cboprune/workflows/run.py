"""The whole CBO job and its steps as library functions; the CLI only wraps these.

    run_pipeline(cfg)           model -> calibration -> Hessian -> energy model -> K lowest states per M
                                (verified on held-out samples, refined) -> report -> checkpoints
    rank_states(...)            (cboprune.engine.experiment) the K best states per M, verified and refined
    solve_rankings(hessian, ...) (cboprune.selection.energy) K lowest states per M from a saved Hessian
    prune_to_checkpoint(...)    remove blocks from a model and save a normal HF checkpoint
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cboprune import heal as healing
from cboprune.core import methods
from cboprune.bench.measure import speedup_summary
from cboprune.core.config import Config
from cboprune.data.calibration import CalibrationSet
from cboprune.energies.hybrid import single_fraction
from cboprune.engine.experiment import SelectionContext, cost_of, rank_states
from cboprune.selection.hessian import HessianResult, compute_hessian, save_hessian
from cboprune.engine.judge import judge_by_healing, judge_recipe
from cboprune.core.methods import selection_cost
from cboprune.models.architectures import decoder_layers, removable_blocks
from cboprune.models.surgery import (
    UnsupportedRemoval,
    remove_blocks,
    save_pruned,
    validate_removal,
)
from cboprune.core.outputs import check_output_dir, dumps_strict, staged_dir
from cboprune.core.ranking import Candidate, Entry, Ranking, found_by
from cboprune.repair import check_repairable, repair_linear
from cboprune.report import plot_hessian, plot_removal_frequency, write_report
from cboprune.engine.session import load_session
from cboprune.core.version import __version__

log = logging.getLogger(__name__)

HESSIAN_FILE = "hessian.safetensors"


def hessian_options(cfg: Config) -> dict[str, Any]:
    """The Hessian-pass keywords of `compute_hessian` from a run configuration."""
    variant = "exact" if cfg.energy == "exact" else cfg.hessian_variant  # the exact energy needs the HVPs
    return {"variant": variant, "autocast": cfg.autocast,
            "gradient_checkpointing": cfg.gradient_checkpointing, "bucket": cfg.bucket,
            "shard_dir": cfg.shard_dir, "shard_samples": cfg.shard_samples}


#: forward tokens above which the selection warns on CPU (2 cores run the default model at ~300 tokens/s)
CPU_TOKEN_WARNING = 2_000_000


def _warn_about_cost(model: torch.nn.Module, fit: CalibrationSet, n: int, m: int, energy: str, pool: int | None,
                     refine_sweeps: int, single_samples: int | None = None) -> None:
    """Forward passes of the fitting set the selection needs (the method's own cost model, plus the
    swap sweeps); a warning when that is hours on CPU."""

    fraction = single_fraction(fit.n_samples, single_samples)
    passes = selection_cost(energy, n, m, pool=pool, single_fraction=fraction) + refine_sweeps * m * (n - m)
    tokens = passes * fit.n_tokens
    log.info("selection: about %.1f forward passes of the %d fitting tokens before verification", passes,
             fit.n_tokens)
    if tokens > CPU_TOKEN_WARNING and next(model.parameters()).device.type == "cpu":
        log.warning("selection: the %s energy%s needs up to %.0f forward passes of the fitting set (%.1f M tokens): "
                    "hours on a few CPU cores. Use a GPU, or --pool P, fewer --n-samples, --refine-sweeps 0, or the "
                    "default energy (docs/study.md)", energy, " with refinement" if refine_sweeps else "", passes,
                    tokens / 1e6)


def _scores_of(candidate: Candidate, ranking: Ranking) -> dict[str, Any]:
    """The state's energy, and its measured held-out NLL when the ranking was verified."""
    ver = ranking.info.get("verification")
    if not ver:
        return {"energy": candidate.score if math.isfinite(candidate.score) else None}
    return {"energy": ver["energies"][candidate.rank], "heldout_nll": candidate.score,
            "found_by": found_by(ver, candidate.rank)}


def provenance(candidate: Candidate, ranking: Ranking, hessian_meta: dict[str, Any], source_model: str,
               hessian_fingerprint: str) -> dict[str, Any]:
    n = ranking.n_blocks
    return {
        "cboprune_version": __version__,
        "source_model": source_model,
        "method": ranking.method,
        "n_blocks_original": n,
        "n_removed": len(candidate.removed),
        "removed": list(candidate.removed),
        "kept": [i for i in range(n) if i not in set(candidate.removed)],
        "removed_names": [hessian_meta.get("block_names", [])[i] for i in candidate.removed]
        if hessian_meta.get("block_names") else [],
        "removed_kinds": [hessian_meta["block_kinds"][i] for i in candidate.removed]
        if hessian_meta.get("block_kinds") else [],
        "state_rank": candidate.rank,
        "energy_model": ranking.info.get("energy_model", "fisher"),
        **_scores_of(candidate, ranking),
        "ranking_exact": ranking.exact,
        "hessian_fingerprint": hessian_fingerprint,
        "calibration": hessian_meta.get("calibration", {}),
    }


def prune_to_checkpoint(model: torch.nn.Module, tokenizer, removed: Sequence[int], out_dir: str | Path,
                        info: dict[str, Any], *, copy_model: bool = True, overwrite: bool = False,
                        save_dtype: str | None = None, speedup: bool = False, repair: str | None = None,
                        calibration: CalibrationSet | None = None, batch_size: int = 8) -> Path:
    """Remove `removed` blocks (original indices) and save_pretrained with `removal.json` and a model
    card; with `repair="linear"` a linear map per removed run, fitted on `calibration` with the
    original model, is folded into the kept weights first (`cboprune.repair`); with `speedup` (needs
    `copy_model`), the measured size and speed against the original go into both
    (`cboprune.bench.measure.measure_speedup`: measured, not estimated from the layer count)."""
    _, layers = decoder_layers(model)
    validate_removal(removed, len(layers))
    pruned = copy.deepcopy(model) if copy_model else model
    if repair:
        if calibration is None:
            raise ValueError("repair needs the calibration samples to fit the maps on")
        pruned, repair_info = repair_linear(pruned, removed, calibration, batch_size=batch_size)
        info = {**info, "repair": repair_info}
    else:
        remove_blocks(pruned, removed)
    if speedup and copy_model:
        info = {**info, "speedup": speedup_summary(model, pruned)}
    return save_pruned(pruned, tokenizer, out_dir, info, overwrite=overwrite, save_dtype=save_dtype)


@dataclass
class RunResult:
    output_dir: Path
    hessian: HessianResult
    rankings: list[Ranking]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)


def run_pipeline(cfg: Config, *, progress: bool = True) -> RunResult:
    out_dir = check_output_dir(cfg.output_dir, cfg.overwrite)
    candidates = cfg.heal_candidates
    if candidates:
        judge_recipe(cfg, out_dir)  # the healing data is checked before any work
    checks = cfg.verify or cfg.refine_sweeps > 0
    session = load_session(cfg, heldout=cfg.heldout_samples if checks else 0,
                           heldout_hint="or pass --no-verify --refine-sweeps 0", check_model=True)
    kinds = session.block_kinds
    keep = session.keep
    removable = removable_blocks(kinds, cfg.only, keep) if cfg.only else None
    log.info("%d blocks: %s", session.n_blocks, ", ".join(f"{i}:{k}" for i, k in enumerate(kinds)))
    if removable is not None:
        log.info("removal restricted to %d blocks of kind %s: %s", len(removable), ",".join(cfg.only), removable)
    if cfg.repair:
        check_repairable(session.model, session.n_blocks)
    fit, heldout = session.fit, session.heldout
    log.info("selection: energy model %s%s%s", cfg.energy, ", verified on %d held-out samples" % heldout.n_samples
             if heldout is not None else "", f", refined by up to {cfg.refine_sweeps} swap sweeps"
             if cfg.refine_sweeps else "")
    # Everything that can be wrong with the input has been checked: now write, staged next to out_dir.

    with staged_dir(out_dir, overwrite=cfg.overwrite) as staging:
        hessian = compute_hessian(session.model, fit, batch_size=cfg.batch_size, model_name=cfg.model,
                                  progress=progress, **hessian_options(cfg))
        save_hessian(hessian, staging / HESSIAN_FILE)
        context = SelectionContext(session.model, fit, heldout, batch_size=cfg.batch_size, keep=tuple(keep),
                                   removable=removable, seed=cfg.seed, solver=cfg.solver, time_limit=cfg.time_limit,
                                   node_limit=cfg.node_limit, options={"pool": cfg.pool, "relin_step": cfg.relin_step,
                                            "single_samples": cfg.single_samples,
                                            "run_cost": cfg.run_cost, "recentre": cfg.recentre},
                                   model_name=cfg.model, progress=progress, cache={"hessian": hessian})
        t0 = time.perf_counter()
        _warn_about_cost(context.model, context.fit, context.n_blocks, max(cfg.remove), cfg.energy,
                         cfg.pool, cfg.refine_sweeps, cfg.single_samples)
        rankings = rank_states(context, cfg.remove, cfg.top, energy=cfg.energy, verify=cfg.verify,
                               refine_sweeps=cfg.refine_sweeps)
        seconds = time.perf_counter() - t0
        selected, judge_cost, judged, judge_seconds = rankings, {}, None, 0.0
        if candidates:
            t0 = time.perf_counter()
            rankings, judged, judge_cost = judge_by_healing(cfg, session, rankings, staging, candidates)
            judge_seconds = time.perf_counter() - t0
        sections = [_cost_section(cfg, selected, session, hessian, seconds, judge_cost, judge_seconds)]
        if judged:
            sections.append(judged)
        rankings_dir = staging / "rankings"
        rankings_dir.mkdir()
        for ranking in rankings:
            (rankings_dir / f"M{ranking.n_remove}.json").write_text(dumps_strict(ranking.to_dict(), indent=2) + "\n")
        (staging / "config.yaml").write_text(_yaml(cfg.to_dict("run")))
        figures = _figures(staging, hessian, rankings)
        checkpoints = _save_checkpoints(cfg, session, rankings, hessian, staging)
        write_report(staging, rankings, meta=hessian.meta, figures=figures, checkpoints=checkpoints,
                     sections=sections)
        (staging / "summary.json").write_text(dumps_strict(
            {"rankings": {r.n_remove: r.to_dict() for r in rankings}, "checkpoints": checkpoints,
             "hessian": hessian.meta}, indent=2) + "\n")
    for ck in checkpoints:
        ck["path"] = str(out_dir / ck["path"])
        if cfg.heal:
            ck["healed"] = heal_checkpoint(cfg, ck["path"], progress=progress)
    return RunResult(output_dir=out_dir, hessian=hessian, rankings=rankings, checkpoints=checkpoints)


def _cost_section(cfg: Config, rankings: Sequence[Ranking], session, hessian: HessianResult,
                  seconds: float, judge_cost: dict[int, float], judge_seconds: float) -> str:
    """The selection's cost in forward passes of the fitting set and its wall time, per M and for
    all M together (the energy model, built once, counted once there)."""

    suffix = "+refine" if cfg.refine_sweeps else "+verify" if cfg.verify else ":0"
    options = {"pool": cfg.pool, "relin_step": cfg.relin_step,
               "single_fraction": single_fraction(session.fit.n_samples, cfg.single_samples)}
    heldout = session.heldout.n_tokens if session.heldout is not None else 0
    rows, per_m = [], {}
    for r in rankings:
        entry = Entry(f"{cfg.energy}{suffix}", r.n_remove, r.best, r, 0.0)
        per_m[r.n_remove] = cost_of(entry, session.n_blocks, fit_tokens=session.fit.n_tokens,
                                    heldout_tokens=heldout, options=options)
        judge = judge_cost.get(r.n_remove, 0.0)
        rows.append(f"| {r.n_remove} | {per_m[r.n_remove]:.1f} | {judge:.1f} | {per_m[r.n_remove] + judge:.1f} |")
    # An energy model whose cost does not depend on M is built once for every M (run_pipeline's cache).
    energy_costs = [methods.get(cfg.energy).cost(session.n_blocks, m, **options) for m in per_m]
    shared = energy_costs[0] if len(set(energy_costs)) == 1 else 0.0
    together = sum(per_m.values()) - shared * (len(per_m) - 1) + sum(judge_cost.values())
    grad = hessian.meta.get("seconds", 0)
    judged = f", the judge {judge_seconds:.1f} s" if judge_cost else ""
    return "\n".join([
        "## Selection cost", "",
        f"Energy `{cfg.energy}`{', verified' if cfg.verify else ''}"
        f"{f', refined ({cfg.refine_sweeps} sweeps at most)' if cfg.refine_sweeps else ''}"
        f"{', judged by a short heal' if judge_cost else ''}, on "
        f"{session.fit.n_samples} fitting samples ({session.fit.n_tokens} tokens). Cost in forward passes of the "
        "fitting set (a backward counts as two; held-out passes by their tokens); per M, the energy model (the "
        "gradient pass and its measurements) is counted in each.", "",
        "| M | selection | judge | forward passes |", "|---:|---:|---:|---:|", *rows, "",
        f"All M together: **{together:.1f} forward passes** (the energy model counted once).", "",
        f"Wall time: gradient pass {grad} s, states for all M {seconds:.1f} s{judged}.", ""])


def _save_checkpoints(cfg: Config, session, rankings: Sequence[Ranking], hessian: HessianResult,
                      staging: Path) -> list[dict[str, Any]]:
    """The states `save_ranks` of the M values `save_remove` as checkpoints under staging/pruned/."""
    checkpoints = []
    save_ms = cfg.remove if cfg.save_remove is None else cfg.save_remove
    for ranking in rankings:
        if ranking.n_remove not in save_ms:
            continue
        for rank in cfg.save_ranks:
            if rank >= len(ranking.candidates):
                continue
            cand = ranking.candidates[rank]
            rel = f"pruned/M{ranking.n_remove}-rank{rank}"
            try:
                path = prune_to_checkpoint(session.model, session.tokenizer, cand.removed, staging / rel,
                                           provenance(cand, ranking, hessian.meta, cfg.model, hessian.fingerprint),
                                           save_dtype=cfg.save_dtype, speedup=cfg.speedup, repair=cfg.repair,
                                           calibration=session.fit, batch_size=cfg.batch_size)
            except UnsupportedRemoval as exc:  # the family's config cannot describe what is left
                log.warning("not saving M=%d rank %d: %s", ranking.n_remove, rank, exc)
                continue
            saved = json.loads((path / "removal.json").read_text())
            checkpoints.append({"n_remove": ranking.n_remove, "rank": rank, "removed": list(cand.removed),
                                "path": rel, "speedup": saved.get("speedup"), "repair": saved.get("repair")})
    return checkpoints


def heal_checkpoint(cfg: Config, checkpoint: str, *, progress: bool = True) -> str:
    """Distill cfg.model into a saved pruned checkpoint; the healed copy goes beside it."""

    out = f"{checkpoint}-healed"
    cache = cfg.teacher_cache_dir()
    healing.heal(healing.HealConfig(student=checkpoint, teacher=cfg.model, data=cfg.heal_data or cfg.data, output_dir=out,
                    max_steps=cfg.heal_steps[0] if cfg.heal_steps else None, seq_len=cfg.heal_seq_len or cfg.seq_len,
                    learning_rate=cfg.heal_lr, micro_batch_size=cfg.heal_micro_batch_size,
                    global_batch_size=cfg.heal_global_batch_size, lora=cfg.heal_lora, seed=cfg.seed,
                    overwrite=cfg.overwrite, teacher_cache=None if cache is None else str(cache),
                    **({} if cfg.heal_heldout_samples is None else {"heldout_samples": cfg.heal_heldout_samples})),
                 progress=progress)
    return out


def _figures(out_dir: Path, hessian: HessianResult, rankings: Sequence[Ranking]) -> dict[str, str]:
    plot_removal_frequency(rankings, out_dir / "removal_frequency.png", hessian.block_kinds)
    plot_hessian(hessian.H, out_dir / "hessian.png")
    return {"How often each block is removed among the lowest states": "removal_frequency.png",
            "Hessian H": "hessian.png"}


def _yaml(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def write_solve_outputs(out_dir: Path, hessian: HessianResult, rankings: Sequence[Ranking]) -> Path:
    """For `cboprune solve --output-dir`: rankings JSON, figures and report from a saved Hessian."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "rankings").mkdir(exist_ok=True)
    for ranking in rankings:
        (out_dir / "rankings" / f"M{ranking.n_remove}.json").write_text(ranking.to_json() + "\n")
    figures = _figures(out_dir, hessian, rankings)
    return write_report(out_dir, rankings, meta=hessian.meta, figures=figures)
