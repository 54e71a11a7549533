"""Evaluation: perplexity, log-likelihood and generation benchmarks, and an lm-eval bridge.

Library entry points::

    from cboprune.evaluation import evaluate, plan_tasks, write_results
    res = evaluate(model, tokenizer, ["arc_easy", "wikitext"], limit=200)
    write_results(res, "out/eval")  # out/eval.json (lm-eval's schema) + out/eval.md

`plan_tasks(names, include_path=..., data_dir=...)` checks task names (built-in and lm-eval's)
before a model loads; `evaluate` accepts the plan it returns.
"""

from __future__ import annotations

from cboprune.core.lazy import lazy_exports

_EXPORTS = {**{n: "cboprune.evaluation.plan" for n in ("BACKENDS", "TaskPlan", "plan_tasks")},
            **{n: "cboprune.evaluation.results" for n in ("markdown_table", "output_paths", "to_lm_eval_schema",
                                                         "write_results")},
            **{n: "cboprune.evaluation.runner" for n in ("check_eval_options", "evaluate")},
            **{n: "cboprune.evaluation.tasks" for n in ("available_names", "resolve_tasks")}}

__all__ = ["BACKENDS", "TaskPlan", "available_names", "check_eval_options", "evaluate", "markdown_table",
           "output_paths", "plan_tasks", "resolve_tasks", "to_lm_eval_schema", "write_results"]

__getattr__ = lazy_exports(__name__, _EXPORTS)
