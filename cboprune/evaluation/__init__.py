"""Evaluation: perplexity, log-likelihood and generation benchmarks, and an lm-eval bridge.

Library entry points::

    from cboprune.evaluation import evaluate, plan_tasks, write_results
    res = evaluate(model, tokenizer, ["arc_easy", "wikitext"], limit=200)
    write_results(res, "out/eval")  # out/eval.json (lm-eval's schema) + out/eval.md

`plan_tasks(names, include_path=..., data_dir=...)` checks task names (built-in and lm-eval's)
before a model loads; `evaluate` accepts the plan it returns.
"""

from __future__ import annotations

from cboprune.evaluation.plan import BACKENDS, TaskPlan, plan_tasks
from cboprune.evaluation.results import markdown_table, output_paths, to_lm_eval_schema, write_results
from cboprune.evaluation.runner import check_eval_options, evaluate
from cboprune.evaluation.tasks import available_names, resolve_tasks

__all__ = ["BACKENDS", "TaskPlan", "available_names", "check_eval_options", "evaluate", "markdown_table",
           "output_paths", "plan_tasks", "resolve_tasks", "to_lm_eval_schema", "write_results"]
