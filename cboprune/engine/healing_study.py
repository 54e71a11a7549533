"""Judging configurations after healing, as the paper does: every distinct configuration gets the
same distillation recipe (data and order, seed, steps, learning rate, teacher), then the same
evaluation as before healing.

    HealRecipe            (cboprune.heal.recipe) the recipe, one or several step budgets
    heal_entries(...)     heal and evaluate every distinct configuration once per budget; results
                          are cached on disk by a fingerprint of (model, configuration, recipe,
                          evaluation), so an interrupted study continues where it stopped
    heal_table / heal_correlations   before/after tables and Spearman correlations per M
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cboprune import heal as healing
from cboprune import models
from cboprune.models import masked
from cboprune.core import methods
from cboprune.core.errors import DivergedError
from cboprune.evaluation.metrics import mean_accuracy, primary_scores
from cboprune.models.merging import apply_configuration
from cboprune.core.finite import metric_cell, require_finite
from cboprune.heal.recipe import HealRecipe
from cboprune.heal.trainer import STATE_SUFFIX
from cboprune.models.surgery import save_pruned
from cboprune.core.ranking import spearman
from cboprune.engine.configurations import configuration_fields, configuration_key, merge_rule_of
from cboprune.engine.repair_comparison import repair_entries, repaired_copy
from cboprune.report.tables import markdown_table
from cboprune.engine.resume import StepCache, heal_state, weights_fingerprint

if TYPE_CHECKING:
    from cboprune.evaluation.protocol import EvalProtocol
    from cboprune.core.ranking import Entry

log = logging.getLogger(__name__)


def _heal_fields(entry: Entry, recipe: HealRecipe, steps: int, protocol: EvalProtocol, nll_fingerprint: str | None,
                 weights: str | None, repair_fit: str | None = None) -> dict[str, Any]:
    """Everything a heal's result depends on: its cache entry's fingerprint."""

    fields = {**configuration_fields(entry.candidate, merge_rule_of(entry)),
              "recipe": {**recipe.describe(), "steps": steps}, "eval": protocol.identity(),
              "nll_samples": nll_fingerprint, "weights": weights}
    if repair_fit is not None:  # healed from the linear repair fitted on these samples
        fields["repair"] = {"method": "linear", "fit": repair_fit}
    return fields


def heal_entries(entries: Sequence[Entry], model, tokenizer, recipe: HealRecipe, protocol: EvalProtocol, *,
                 nll_samples, batch_size: int = 8, workdir: Path, progress: bool = False, repair_fit=None,
                 weights: str | None = None) -> None:
    """entry.healed[S] = {"nll", "eval", "heal_ce", "heal_kl", "seconds"} for every budget S; entries
    with the same configuration share one heal. `nll_samples` None: no calibration NLL after (the
    judge ranks by heal CE alone). With `repair_fit` (calibration samples) every student
    starts from the linear repair fitted on them instead, and the results go to entry.repair_healed.
    `weights`: `weights_fingerprint(model)` when the caller has it already."""


    cache = StepCache(recipe.cache_dir)
    # the teacher's name alone would reuse heals of replaced weights (nothing to key without a cache)
    if weights is None and cache.directory is not None:
        weights = weights_fingerprint(model)
    workdir.mkdir(parents=True, exist_ok=True)
    done: dict[tuple, Entry] = {}
    slot = "healed" if repair_fit is None else "repair_healed"
    for entry in entries:
        if repair_fit is not None and entry.candidate.merged:
            continue  # the linear repair replaces removed blocks, not merged ones
        key = configuration_key(entry.candidate, merge_rule_of(entry))
        if key in done:
            setattr(entry, slot, getattr(done[key], slot))
            continue
        done[key] = entry
        for steps in recipe.steps:
            fields = _heal_fields(entry, recipe, steps, protocol,
                                  None if nll_samples is None else nll_samples.fingerprint, weights,
                                  repair_fit.fingerprint if repair_fit is not None else None)
            digest = cache.key(fields)
            result = cache.load(fields, lambda v: heal_state(v, getattr(protocol, "task_names", ())))
            if result is not None:
                getattr(entry, slot)[steps] = result
                log.info("healing: %s at M = %d, %d steps: reused %s", entry.method, entry.n_remove, steps,
                         cache.path(fields))
                continue
            t0 = time.perf_counter()
            student = workdir / f"{digest}-student"
            healed_dir = (recipe.keep_checkpoints / f"M{entry.n_remove}-{entry.method.replace(':', '-')}"
                                                        f"{'-repaired' if repair_fit is not None else ''}-S{steps}"
                          if recipe.keep_checkpoints is not None else workdir / f"{digest}-healed")
            shutil.rmtree(student, ignore_errors=True)
            # A study's heal is short and rerun, never resumed, so it saves no training state (save_every=0);
            # a state left by a kill (or an older version) would make heal() refuse to start over it.
            shutil.rmtree(healed_dir.with_name(healed_dir.name + STATE_SUFFIX), ignore_errors=True)
            if repair_fit is not None:
                start = repaired_copy(model, entry.candidate.removed, repair_fit, batch_size=batch_size)[0]
            else:
                start = apply_configuration(model, entry.candidate, merge_rule_of(entry))
            save_pruned(start, tokenizer, student,
                        {"source_model": recipe.teacher, "removed": list(entry.candidate.removed),
                         "merged": [list(g) for g in entry.candidate.merged], "method": entry.method},
                        save_dtype="float32")  # the student starts from exactly the evaluated model
            del start
            try:
                report = healing.heal(healing.HealConfig(student=str(student), teacher=recipe.teacher, data=recipe.data,
                                         output_dir=str(healed_dir), max_steps=steps, learning_rate=recipe.learning_rate,
                                         seq_len=recipe.seq_len, micro_batch_size=recipe.micro_batch_size,
                                         global_batch_size=recipe.global_batch_size, lora=recipe.lora, seed=recipe.seed,
                                         max_samples=recipe.max_samples, save_every=0, overwrite=True,
                                         teacher_cache=None if recipe.teacher_cache is None else str(recipe.teacher_cache),
                                         teacher_top_k=recipe.teacher_top_k, heldout_eval=recipe.heldout_eval,
                                         **({} if recipe.heldout_samples is None
                                            else {"heldout_samples": recipe.heldout_samples})),
                              progress=progress)
            except DivergedError as exc:  # a catastrophic removal may heal into NaN: a result, shown as diverged
                log.warning("%s", exc)
                result = _diverged_result(entry, recipe, str(exc), round(time.perf_counter() - t0, 1))
                shutil.rmtree(student, ignore_errors=True)
                getattr(entry, slot)[steps] = result
                cache.save(fields, result)
                continue
            healed = models.load_model(str(healed_dir), dtype="float32", device=str(next(model.parameters()).device),
                                       tokenizer=False).model
            nll = None if nll_samples is None else require_finite(
                masked.calibration_nll(healed, nll_samples, batch_size=batch_size), "the held-out NLL",
                f"{entry.method} at M = {entry.n_remove} healed", f"step {steps}")
            result = {"nll": nll,
                      "eval": protocol.evaluate(healed, tokenizer),
                      "heal_ce": (report.get("heldout_loss_after") or {}).get("student"),
                      "heal_kl": (report.get("heldout_loss_after") or {}).get("kl_to_teacher"),
                      "heal_ce_before": (report.get("heldout_loss_before") or {}).get("student"),
                      "teacher_ce": (report.get("heldout_loss_before") or {}).get("teacher"),
                      "steps": report.get("steps"), "seconds": round(time.perf_counter() - t0, 1),
                      # what was healed, so that a cache directory can be read without the run
                      "method": entry.method, "n_remove": entry.n_remove, "removed": list(entry.candidate.removed),
                      "start": "pruned" if repair_fit is None else "repaired", "seed": recipe.seed,
                      "teacher_samples_computed": report.get("teacher_samples_computed"),
                      "token_positions": report.get("token_positions")}
            del healed
            shutil.rmtree(student, ignore_errors=True)
            if recipe.keep_checkpoints is None:
                shutil.rmtree(healed_dir, ignore_errors=True)
            getattr(entry, slot)[steps] = result
            cache.save(fields, result)
            log.info("healing: %s at M = %d, %d steps: NLL %s -> %s, heal CE %s (%.0f s)", entry.method,
                     entry.n_remove, steps, metric_cell(entry.nll), metric_cell(result["nll"]),
                     metric_cell(result["heal_ce"]), result["seconds"])
    shutil.rmtree(workdir, ignore_errors=True)


def _diverged_result(entry: Entry, recipe: HealRecipe, why: str, seconds: float) -> dict[str, Any]:
    """A heal whose loss stopped being a number: every metric NaN (tables read "diverged", sorts put
    it last, results files say "diverged"), with the reason."""
    nan = math.nan
    return {"nll": nan, "eval": {"results": {}}, "heal_ce": nan, "heal_kl": nan, "heal_ce_before": None,
            "teacher_ce": None, "steps": None, "seconds": seconds, "diverged": why, "method": entry.method,
            "n_remove": entry.n_remove, "removed": list(entry.candidate.removed), "start": "pruned",
            "seed": recipe.seed, "teacher_samples_computed": None, "token_positions": None}


def heal_and_repair(entries: Sequence[Entry], model, tokenizer, protocol: EvalProtocol, *,
                    recipe: HealRecipe | None, repair: str | None, fit, nll_samples, batch_size: int,
                    workdir: Path, progress: bool, weights: str | None = None) -> None:
    """The after-pruning judges of compare/study: heal every configuration with `recipe` (if any);
    with `repair`, also evaluate it repaired (fitted on `fit`) and heal it from the repair."""
    kw = dict(nll_samples=nll_samples, batch_size=batch_size, workdir=workdir, progress=progress, weights=weights)
    if recipe is not None:
        heal_entries(entries, model, tokenizer, recipe, protocol, **kw)
    if repair:
        repair_entries(entries, model, tokenizer, protocol, fit=fit, nll_samples=nll_samples, batch_size=batch_size)
        if recipe is not None:
            heal_entries(entries, model, tokenizer, recipe, protocol, repair_fit=fit, **kw)


# ----------------------------------------------------------------------------- cost

# ----------------------------------------------------------------------------- tables

def _spearman(a: Sequence[float], b: Sequence[float]) -> float:
    return spearman(list(a), list(b))


def _heal_ce_pairs(rows: Sequence[Entry], steps: int, before) -> tuple[list[float], list[float]]:
    """(before(row), heal CE after `steps`) over the rows that have both."""
    pairs = [(before(r), r.healed[steps].get("heal_ce")) for r in rows]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    return [a for a, _ in pairs], [b for _, b in pairs]


def heal_correlations(entries: Sequence[Entry], steps: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Per M: Spearman between pre-heal and post-heal loss over the distinct configurations, for every
    budget, and between the first and the last budget's post-heal loss (does the order converge?).
    Twice: on the comparison's NLL samples (`pre_vs_post_S`; for study, samples of the calibration file,
    which the heal may have trained on when it is also the heal data) and on the heal data's held-out
    records, never trained on (`..._ce`: heal CE before against after)."""
    out: dict[int, dict[str, Any]] = {}
    for m in sorted({e.n_remove for e in entries}):
        rows = [e for e in entries if e.n_remove == m and e.same_as is None and e.healed and e.nll is not None]
        d: dict[str, Any] = {"n": len(rows)}
        for s in steps:
            d[f"pre_vs_post_{s}"] = _spearman([e.nll for e in rows], [e.healed[s]["nll"] for e in rows])
            d[f"pre_vs_post_{s}_ce"] = _spearman(*_heal_ce_pairs(rows, s, lambda r, s=s: r.healed[s].get("heal_ce_before")))
        if len(steps) > 1:
            d["post_first_vs_last"] = _spearman([e.healed[steps[0]]["nll"] for e in rows],
                                                [e.healed[steps[-1]]["nll"] for e in rows])
            d["post_first_vs_last_ce"] = _spearman(*_heal_ce_pairs(
                rows, steps[-1], lambda r: r.healed[steps[0]].get("heal_ce")))
        out[m] = d
    return out


def energy_heal_correlations(entries: Sequence[Entry], steps: Sequence[int]) -> dict[str, dict[int, dict]]:
    """Per energy model and M: Spearman between the energy and the loss before and after healing over
    its healed low-energy states (entries `<energy>:<rank>`): the NLL and, after, also the heal CE."""

    out: dict[str, dict[int, dict]] = {}
    for e in entries:
        base, _, rank = e.method.partition(":")
        if not rank or not e.healed or methods.get(base).kind != methods.ENERGY:
            continue
        out.setdefault(base, {}).setdefault(e.n_remove, []).append(e)
    result: dict[str, dict[int, dict]] = {}
    for name, by_m in out.items():
        for m, rows in by_m.items():
            if len(rows) < 3:
                continue
            energies = [r.candidate.score for r in rows]
            d: dict[str, Any] = {"n": len(rows), "energy_vs_pre": _spearman(energies, [r.nll for r in rows])}
            for s in steps:
                d[f"energy_vs_post_{s}"] = _spearman(energies, [r.healed[s]["nll"] for r in rows])
                d[f"energy_vs_post_{s}_ce"] = _spearman(*_heal_ce_pairs(rows, s, lambda r: r.candidate.score))
            result.setdefault(name, {})[m] = d
    return result


def heal_table(entries: Sequence[Entry], steps: Sequence[int], label, ppl_task: str | None,
               accuracy_tasks: list[str]) -> tuple[list[str], list[list[str]]]:
    """One row per entry: NLL before and after each budget, the perplexity task and mean accuracy
    after, heal seconds, and the selection's cost beside them (quality against cost on one page)."""

    header = ["M", "method", "removed", "NLL before", "heal CE before"]
    for s in steps:
        header += [f"NLL after {s}", f"heal CE after {s}"] + ([f"{ppl_task} after {s}"] if ppl_task else []) \
            + [f"mean acc after {s}"]
    header += ["heal s", "selection cost (fwd passes)", "selection s"]
    rows = []
    for e in entries:
        if not e.healed:
            continue
        row = [str(e.n_remove), label(e.method) + (f" (= {label(e.same_as)})" if e.same_as else ""),
               "[" + ", ".join(map(str, e.candidate.removed)) + "]", metric_cell(e.nll)]
        ce_before = e.healed[steps[0]].get("heal_ce_before")  # the same pruned model for every budget
        row.append(metric_cell(ce_before))
        seconds = 0.0
        for s in steps:
            h = e.healed[s]
            ce = h.get("heal_ce")
            row += [metric_cell(h['nll']), metric_cell(ce)]
            if ppl_task:
                v = primary_scores(h["eval"]).get(ppl_task)
                row.append(metric_cell(v, ".2f"))
            acc = mean_accuracy(h["eval"], accuracy_tasks)
            row.append(metric_cell(acc))
            seconds += h.get("seconds") or 0.0
        row.append("0" if e.same_as else f"{seconds:.0f}")
        row += ["—" if e.cost is None else f"{e.cost:.4g}", f"{e.selection_seconds:.1f}"]
        rows.append(row)
    return header, rows


def _rho(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}"


def correlation_table(corr: dict[int, dict[str, Any]], steps: Sequence[int]) -> tuple[list[str], list[list[str]]]:
    header = ["M", "configurations", *[f"ρ(pre, post {s}) {what}" for s in steps for what in ("NLL", "heal CE")]]
    if len(steps) > 1:
        header += [f"ρ(post {steps[0]}, post {steps[-1]}) {what}" for what in ("NLL", "heal CE")]
    rows = []
    for m, d in corr.items():
        row = [str(m), str(d["n"]), *[_rho(d[f"pre_vs_post_{s}{k}"]) for s in steps for k in ("", "_ce")]]
        if len(steps) > 1:
            row += [_rho(d["post_first_vs_last"]), _rho(d["post_first_vs_last_ce"])]
        rows.append(row)
    return header, rows


def healing_markdown(entries: Sequence[Entry], meta: dict[str, Any], label) -> str:
    """The before/after page of a comparison: the recipe, the table, the Spearman correlations."""

    recipe = meta["healing"]
    steps = recipe["steps"]
    ppl_task = meta["ppl_tasks"][0] if meta.get("ppl_tasks") else None
    accuracy = [t for t in meta["tasks"] if t not in meta.get("ppl_tasks", [])]
    h1, r1 = heal_table(entries, steps, label, ppl_task, accuracy)
    corr = heal_correlations(entries, steps)
    h2, r2 = correlation_table(corr, steps)
    text = [f"# After healing: {meta['model']} (N = {meta['n_blocks']})\n",
            f"Every distinct configuration distilled from the original model with one recipe: {steps} optimizer "
            f"steps (each budget healed from the pruned model), {recipe['global_batch_size']} x "
            f"{recipe['seq_len']} tokens per step of {recipe['data']}, learning rate {recipe['learning_rate']}, "
            f"seed {recipe['seed']}{', LoRA' if recipe['lora'] else ', all weights'}. NLL: the comparison's own "
            "samples (compare: calibration; study: held-out); heal CE: the healing data's held-out records "
            "(never trained on). Lower is better.\n",
            markdown_table(h1, r1),
            "## Does the loss before healing predict the loss after? (Spearman ρ over the distinct configurations)\n",
            markdown_table(h2, r2)]
    by_energy = energy_heal_correlations(entries, steps)
    if by_energy:
        header = ["energy model", "M", "states", "ρ(energy, NLL before)",
                  *[f"ρ(energy, {what} after {s})" for s in steps for what in ("NLL", "heal CE")]]
        rows = [[name, str(m), str(d["n"]), _rho(d["energy_vs_pre"]),
                 *[_rho(d[f"energy_vs_post_{s}{k}"]) for s in steps for k in ("", "_ce")]]
                for name, by_m in by_energy.items() for m, d in sorted(by_m.items())]
        text += ["## Does the energy predict the loss after healing? (its lowest states)\n", markdown_table(header, rows)]
    return "\n".join(text)
