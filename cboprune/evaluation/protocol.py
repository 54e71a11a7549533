"""The comparison protocol: which tasks, how many items, which number a table shows.

`compare` and `study` (through `cboprune.engine.experiment`) evaluate the original model and every
distinct pruned configuration with one `EvalProtocol`, so every method is judged alike.
Perplexity tasks (kind "rolling") take `ppl_limit` documents, the others `limit` items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cboprune.core.errors import CBOPruneError
from cboprune.evaluation import evaluate
from cboprune.evaluation.domains import check_heldout, evaluate_domains, resolve_domains
from cboprune.evaluation.plan import plan_tasks

DEFAULT_TASKS = "wikitext,arc_easy,hellaswag,piqa,winogrande"
#: the metric a table cell shows, in order of preference


@dataclass
class EvalProtocol:
    tasks: str = DEFAULT_TASKS
    limit: int | None = None
    ppl_limit: int | None = None  # None: `limit`
    batch_size: int = 32
    data_dir: str | None = None
    max_length: int | None = None
    seed: int = 0
    progress: bool = False
    include_path: str | None = None  # the user's lm-eval task YAMLs
    domains: str | None = None  # held-out domains (cboprune.evaluation.domains), each scored separately
    domain_limit: int = 200  # items per domain
    data: str | None = None  # the calibration spec, for the `calib` domain
    ppl_tasks: list[str] = field(init=False, default_factory=list)
    other_tasks: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        """Unknown task names, bad limits and missing evaluation data fail here, before any work."""

        for name, value in (("--limit", self.limit), ("--ppl-limit", self.ppl_limit)):
            if value is not None and value < 1:
                raise CBOPruneError(f"{name} must be a positive number of items, got {value}")
        self._domains = []
        if self.domains:
            if self.domain_limit < 1:
                raise CBOPruneError(f"--domain-limit must be a positive number of items, got {self.domain_limit}")
            self._domains = resolve_domains(self.domains, data=self.data, data_dir=self.data_dir)
        if not [t for t in (self.tasks or "").split(",") if t.strip()]:
            if not self._domains:
                raise CBOPruneError("no evaluation task given: pass --tasks, e.g. --tasks wikitext,arc_easy")
            self._plan = None  # the domains alone (--tasks '')
        else:  # any task lm-eval knows: the built-in evaluator for its own tasks, lm-eval for the rest
            self._plan = plan_tasks(self.tasks, include_path=self.include_path, data_dir=self.data_dir)
            self.ppl_tasks = self._plan.perplexity_tasks()
            self.other_tasks = self._plan.other_tasks()
        if self.ppl_limit is None:
            self.ppl_limit = self.limit

    @property
    def task_names(self) -> list[str]:
        return self.ppl_tasks + self.other_tasks

    def evaluate(self, model, tokenizer) -> dict[str, Any]:
        """{"results": {task: entry}, "groups": ..., "config": {"seconds": ...}} for one model."""

        out: dict[str, Any] = {"results": {}, "groups": {}, "config": {}}
        for names, lim in ((self.ppl_tasks, self.ppl_limit), (self.other_tasks, self.limit)):
            if not names:
                continue
            res = evaluate(model, tokenizer, self._plan.subset(names), limit=lim, batch_size=self.batch_size,
                           data_dir=self.data_dir, max_length=self.max_length, seed=self.seed, progress=self.progress,
                           include_path=self.include_path)
            out["results"].update(res["results"])
            out["groups"].update(res.get("groups", {}))
            out["config"]["seconds"] = round(out["config"].get("seconds", 0.0) + res["config"].get("seconds", 0.0), 2)
        if self._domains:
            out["domains"] = evaluate_domains(model, tokenizer, self._domains, limit=self.domain_limit,
                                              batch_size=self.batch_size, max_length=self.max_length, seed=self.seed,
                                              data_dir=self.data_dir, progress=self.progress)
            out["config"]["seconds"] = round(out["config"].get("seconds", 0.0)
                                             + sum(d["seconds"] for d in out["domains"].values()), 2)
        return out

    def check_heldout(self, calibration, heal_data: str | None = None) -> None:
        """The domains' held-out records never overlap those `calibration` read (see `domains.check_heldout`)."""
        if self._domains:
            check_heldout(self._domains, calibration, self.domain_limit, heal_data)

    def describe(self) -> dict[str, Any]:
        out = {"tasks": self.task_names, "ppl_tasks": self.ppl_tasks, "limit": self.limit,
               "ppl_limit": self.ppl_limit, "max_length": self.max_length, "include_path": self.include_path}
        if self._domains:  # only then: the keys of kept evaluations without domains stay the same
            out["domains"] = [d.describe() for d in self._domains]
            out["domain_limit"] = self.domain_limit
        return out

    def identity(self) -> dict[str, Any]:
        """Everything that can change a result: what kept evaluations are fingerprinted by."""
        from pathlib import Path

        return {**self.describe(), "seed": self.seed, "batch_size": self.batch_size,
                "data_dir": str(Path(self.data_dir).resolve()) if self.data_dir else None}
