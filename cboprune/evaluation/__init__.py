"""Evaluation: perplexity, log-likelihood and generation benchmarks, and an lm-eval bridge.

Library entry points::

    from cboprune.evaluation import evaluate, write_results
    res = evaluate(model, tokenizer, ["arc_easy", "wikitext"], limit=200)
    write_results(res, "out/eval")  # out/eval.json + out/eval.md
"""

from __future__ import annotations

from cboprune.evaluation.results import markdown_table, write_results
from cboprune.evaluation.runner import BACKENDS, evaluate
from cboprune.evaluation.tasks import available_names, resolve_tasks

__all__ = ["BACKENDS", "available_names", "evaluate", "markdown_table", "resolve_tasks", "write_results"]
