"""The one experiment skeleton of `compare` and `study`: protocol and output checks, the healing
recipe, the session, the selection context, resumable steps, evaluation of every distinct
configuration, cost, heal / repair, and the staged write. The two front ends only choose methods,
order their rows and write their tables.

    run = start_experiment(cfg, "study", heldout=cfg.heldout_samples, min_kept=2, options={...})
    entries = run.step("peer", "bi", parse, compute)        # kept when healing, so a rerun resumes
    baseline = run.evaluate(entries, nll_samples=run.session.heldout, key="heldout_nll", cost=...)
    run.heal(entries, nll_samples=run.session.heldout)
    run.write(lambda stage: write_outputs(result, stage))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from cboprune.evaluation.protocol import EvalProtocol
from cboprune.engine.experiment import SelectionContext, evaluate_entries, evaluate_original
from cboprune.engine.healing_study import heal_and_repair
from cboprune.heal.recipe import HealRecipe
from cboprune.core.outputs import check_output_dir, staged_dir
from cboprune.core.ranking import Entry
from cboprune.repair import check_repairable
from cboprune.core import methods
from cboprune.engine.resume import StepCache, command_steps, peer_settings, selection_settings
from cboprune.engine.session import Session, load_session

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ExperimentRun:
    """Everything one compare / study run shares between its steps."""

    cfg: Any
    command: str
    protocol: EvalProtocol
    out_dir: Path
    recipe: HealRecipe | None
    session: Session
    context: SelectionContext
    steps: StepCache
    weights: str | None
    step_fields: dict[str, Any]
    started: float
    seconds: dict[str, float] = field(default_factory=dict)

    def step_key(self, step: str, method: str) -> dict[str, Any]:
        """The fields a kept selection step is stored under: the run's settings (a peer's without the
        energy-only search settings) and the method's algorithm `scheme`, so that a step kept by an
        older algorithm is not reused (an empty scheme keeps the earlier keys)."""
        fields = {**self.step_fields, "step": step, "method": method}
        if step == "peer":
            fields["settings"] = peer_settings(fields["settings"])
        scheme = methods.get(method).scheme if method in methods.names() else ""
        if scheme:
            fields["scheme"] = scheme
        return fields

    def kept(self, step: str, method: str, parse: Callable[[dict[str, Any]], T]) -> T | None:
        """A selection step a finished run left (through `parse`, which raises on a damaged value), or None."""
        fields = self.step_key(step, method)
        kept = self.steps.load(fields, parse)
        if kept is not None:
            log.info("%s: %s %s reused from %s", self.command, step, method, self.steps.path(fields))
        return kept

    def step(self, step: str, method: str, parse: Callable[[dict[str, Any]], T],
             compute: Callable[[], tuple[T, dict[str, Any]]]) -> T:
        """A selection step kept beside the heals: reused when a finished run left it, else `compute()` ->
        (value, JSON state to keep)."""
        kept = self.kept(step, method, parse)
        if kept is not None:
            return kept
        value, state = compute()
        self.steps.save(self.step_key(step, method), state)
        return value

    def evaluate(self, entries: Sequence[Entry], *, nll_samples, key: str, cost: Callable[[Entry], float],
                 speedup: bool = False) -> dict[str, Any]:
        """The original's evaluation (its mean NLL on `nll_samples` under `key`) and every distinct
        configuration's, once; each entry's selection cost. Finished evaluations are reused."""
        t0 = time.perf_counter()
        self.seconds["selection"] = round(t0 - self.started, 2)
        model, tokenizer, batch = self.session.model, self.session.tokenizer, self.cfg.batch_size
        fields = {"weights": self.weights}
        baseline = evaluate_original(model, tokenizer, self.protocol, nll_samples, batch, self.steps, fields, key=key)
        evaluate_entries(entries, model, tokenizer, self.protocol, nll_samples=nll_samples, batch_size=batch,
                         speedup=speedup, cache=self.steps, cache_fields=fields)
        for e in entries:
            e.cost = cost(e)
        self.seconds["evaluation"] = round(time.perf_counter() - t0, 2)
        return baseline

    def heal(self, entries: Sequence[Entry], *, nll_samples) -> None:
        """The after-pruning judges: every configuration healed with the recipe (if any) and / or repaired."""
        heal_and_repair(entries, self.session.model, self.session.tokenizer, self.protocol, recipe=self.recipe,
                        repair=self.cfg.repair, fit=self.session.fit, nll_samples=nll_samples,
                        batch_size=self.cfg.batch_size, progress=self.context.progress,
                        workdir=self.out_dir.with_name(self.out_dir.name + ".heal-work"), weights=self.weights)

    def meta(self) -> dict[str, Any]:
        """What every results file records about the run (the front end adds its own)."""
        cfg = self.cfg
        return {"model": cfg.model, "n_blocks": self.session.n_blocks, "remove": cfg.remove, **self.protocol.describe(),
                "batch_size": cfg.batch_size, "seed": cfg.seed, "device": self.session.device, "dtype": cfg.dtype,
                "torch_threads": torch.get_num_threads(),
                "healing": self.recipe.describe() if self.recipe is not None else None, "repair": cfg.repair}

    def timings(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self.started, 2)}

    def write(self, write: Callable[[Path], Any]) -> None:
        """All of the outputs or nothing: `write(stage)` fills a staging directory that becomes out_dir."""
        with staged_dir(self.out_dir, overwrite=self.cfg.overwrite) as stage:
            write(stage)


def start_experiment(cfg, command: str, *, heldout: int = 0, min_kept: int = 1,
                     options: dict[str, Any] | None = None, progress: bool = True) -> ExperimentRun:
    """Every check that needs no work first (protocol, output, healing data), then the model and the
    calibration, the selection context and the step cache (kept only when healing: hours)."""
    protocol = EvalProtocol(cfg.tasks, cfg.limit, cfg.ppl_limit, cfg.eval_batch_size, cfg.data_dir, cfg.max_length,
                            cfg.seed, progress, cfg.include_path, domains=cfg.domains, domain_limit=cfg.domain_limit,
                            data=cfg.data)
    out_dir = check_output_dir(cfg.output_dir, cfg.overwrite)
    recipe = cfg.heal_recipe(out_dir)  # the healing data is checked before any work
    started = time.perf_counter()
    session = load_session(cfg, remove=cfg.remove, min_kept=min_kept, heldout=heldout)
    if cfg.repair:
        check_repairable(session.model, session.n_blocks)
    protocol.check_heldout(session.fit, cfg.heal_data or cfg.data)  # read counts cover the held-out part too
    context = SelectionContext(session.model, session.fit, session.heldout, batch_size=cfg.batch_size, seed=cfg.seed,
                               time_limit=cfg.time_limit, options=dict(options or {}), model_name=cfg.model,
                               progress=progress)
    steps, weights = command_steps(recipe, session.model)
    step_fields = {"command": command, "weights": weights, "fit": session.fit.fingerprint,
                   **({"heldout": session.heldout.fingerprint if session.heldout is not None else None}
                      if heldout else {}),
                   "settings": selection_settings(cfg, command)}
    return ExperimentRun(cfg, command, protocol, out_dir, recipe, session, context, steps, weights, step_fields,
                         started)


__all__ = ["ExperimentRun", "start_experiment"]
