"""Cross-check of the built-in evaluator against lm-eval itself on the real default model.

A small item count keeps this in CI's budget; the full >= 200-item figures come from
`benchmarks/eval_speed.py` and are recorded in docs/evaluation.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cboprune.evaluation import evaluate

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CBOPRUNE_DATA_DIR", REPO.parent / "shared" / "data"))

pytestmark = [pytest.mark.slow, pytest.mark.real_model,
              pytest.mark.skipif(not DATA.is_dir(), reason=f"shared data not found at {DATA}")]

TASKS = ["arc_easy", "hellaswag", "piqa", "winogrande"]


def test_builtin_agrees_with_lm_eval_on_default_model(default_model):
    model, tok = default_model.model, default_model.tokenizer
    kw = {"limit": 8, "data_dir": DATA, "log_samples": True, "batch_size": 16}
    ours = evaluate(model, tok, TASKS, progress=False, **kw)
    theirs = evaluate(model, tok, TASKS, backend="lm-eval", **kw)
    assert ours["results"]["arc_easy"]["config"]["shared_prefix"] is True
    for task in TASKS:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) == 8
        same = sum(x["pred"] == y["pred"] for x, y in zip(a, b)) / len(a)
        assert same >= 0.99, task
        worst = max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x["lls"], y["lls"]))
        assert worst < 5e-3, (task, worst)
        for metric, value in ours["results"][task]["metrics"].items():
            assert value == pytest.approx(theirs["results"][task]["metrics"][metric], abs=0.005), (task, metric)


def test_perplexity_agrees_with_lm_eval_on_default_model(default_model):
    model, tok = default_model.model, default_model.tokenizer
    kw = {"limit": 1, "data_dir": DATA, "max_length": 256}
    ours = evaluate(model, tok, ["wikitext"], progress=False, **kw)["results"]["wikitext"]["metrics"]
    theirs = evaluate(model, tok, ["wikitext"], backend="lm-eval", **kw)["results"]["wikitext"]["metrics"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric] == pytest.approx(theirs[metric], rel=0.005), metric
    assert 1 < ours["word_perplexity"] < 1000
