"""`evaluate()`: run tasks on an in-memory model with the built-in evaluator or lm-eval."""

from __future__ import annotations

import logging
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cboprune.core.errors import CBOPruneError
from cboprune.evaluation import metrics as M
from cboprune.evaluation.data import wikitext_detokenize
from cboprune.evaluation.lm_eval_bridge import evaluate_with_lm_eval
from cboprune.evaluation.plan import TaskPlan, plan_tasks
from cboprune.evaluation.scorer import Scorer
from cboprune.evaluation.tasks import GROUPS, TaskSpec

log = logging.getLogger(__name__)

FEWSHOT_SEED = 1234  # lm-eval's default few-shot sampler seed


def evaluate(model: torch.nn.Module, tokenizer: Any, tasks: str | list[str] | TaskPlan, *,
             limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 32,
             backend: str = "auto", data_dir: str | Path | None = None, seed: int = 0,
             max_length: int | None = None, stride: int | None = None, log_samples: bool = False,
             progress: bool = True, share_prefix: bool | None = None, include_path: str | Path | None = None,
             apply_chat_template: bool = False) -> dict:
    """Evaluate an in-memory causal LM on benchmark tasks.

    Args:
        model: a transformers causal LM (any device; evaluated in eval mode, without gradients).
        tokenizer: its tokenizer.
        tasks: names (list or comma-separated) or a `TaskPlan` from `plan_tasks()`. Built-in:
            arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, lambada_openai,
            wikitext, gsm8k, mmlu (57 subjects) or mmlu_<subject>, bbh (27 subtasks) or
            bbh_<subtask>, `file:PATH` (perplexity of a text file); any other name is an lm-eval
            task (its own configs, or YAMLs under `include_path`).
        limit: evaluate the first `limit` items of each task (documents for perplexity).
        num_fewshot: few-shot examples per prompt (default: the task's, 0 except GSM8K's 5).
        batch_size: rows per forward pass.
        backend: "auto" (built-in evaluator for the tasks it implements, lm-eval for the rest),
            "builtin" or "lm-eval" (everything through lm-evaluation-harness; built-in tasks on
            the same local data). See `plan_tasks`.
        data_dir: folder holding `eval/` (default: `CBOPRUNE_DATA_DIR`, then `../shared/data`).
        seed: seeds torch, numpy and Python's RNG before each task.
        max_length: context window (default: the model's, capped at 2048).
        stride: perplexity stride in tokens (default: `max_length`, lm-eval's disjoint windows).
        log_samples: also return per-item predictions under "samples".
        share_prefix: pack each item's choices around their common prefix (None: auto-probe).
        include_path: a folder of the user's lm-eval task YAMLs.
        apply_chat_template: render prompts with the tokenizer's chat template (lm-eval only).

    Returns:
        `{"results": {task: {"metrics", "stderr", "n", "config"}}, "groups": {...},
        "config": {...}, "samples": {...}, "lm_eval": {...}}` (samples only with `log_samples`;
        `lm_eval`, lm-eval's own output, only when lm-eval ran).
    """
    check_eval_options(limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, max_length=max_length,
                       stride=stride)
    plan = plan_tasks(tasks, backend=backend, include_path=include_path, data_dir=data_dir,
                      apply_chat_template=apply_chat_template)
    was_training = model.training
    model.eval()
    started = time.time()
    try:
        parts = []
        if plan.builtin:
            parts.append(_evaluate_builtin(model, tokenizer, plan.builtin, limit=limit, num_fewshot=num_fewshot,
                                           batch_size=batch_size, eval_dir=plan.eval_dir, seed=seed,
                                           max_length=max_length, stride=stride, log_samples=log_samples,
                                           progress=progress, share_prefix=share_prefix))
        if plan.uses_lm_eval:
            parts.append(evaluate_with_lm_eval(model, tokenizer, plan, limit=limit, num_fewshot=num_fewshot,
                                               batch_size=batch_size, seed=seed, max_length=max_length,
                                               log_samples=log_samples, apply_chat_template=apply_chat_template))
    finally:
        model.train(was_training)
    out = _merge(parts, plan)
    out["config"].update({"backend": backend, "limit": limit, "num_fewshot": num_fewshot,
                          "batch_size": batch_size, "seed": seed, "apply_chat_template": apply_chat_template,
                          "include_path": str(plan.include_path) if plan.include_path else None,
                          "seconds": round(time.time() - started, 2)})
    return out


def check_eval_options(*, limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 32,
                       max_length: int | None = None, stride: int | None = None) -> None:
    """One-line errors for numeric options out of range (before any model work)."""
    if limit is not None and limit < 1:
        raise CBOPruneError(f"--limit must be a positive number of items, got {limit}")
    if num_fewshot is not None and num_fewshot < 0:
        raise CBOPruneError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    if batch_size < 1:
        raise CBOPruneError(f"--batch-size must be a positive number of rows, got {batch_size}")
    if max_length is not None and max_length < 2:
        raise CBOPruneError(f"--max-length must be at least 2 tokens, got {max_length}")
    if stride is not None and (stride < 1 or max_length is not None and stride > max_length):
        raise CBOPruneError(f"--stride {stride} must be between 1 and --max-length "
                            f"{max_length if max_length is not None else '(the context length)'}")


def _merge(parts: list[dict], plan: TaskPlan) -> dict:
    """One result from the built-in and the lm-eval part (built-in tasks first)."""
    out: dict[str, Any] = {"results": {}, "groups": {}, "config": {}}
    for part in parts:
        out["results"].update(part["results"])
        out["groups"].update(part["groups"])
        out["config"].update({k: v for k, v in part["config"].items() if k not in out["config"]})
        for key in ("samples", "lm_eval"):
            if key in part:
                out.setdefault(key, {}).update(part[key])
    out["config"]["data_dir"] = str(plan.eval_dir) if plan.eval_dir else None
    return out


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _evaluate_builtin(model, tokenizer, specs: list[TaskSpec], *, limit, num_fewshot, batch_size, eval_dir, seed,
                      max_length, stride, log_samples, progress, share_prefix) -> dict:
    scorer = Scorer(model, tokenizer, batch_size=batch_size, max_length=max_length,
                    share_prefix=share_prefix, progress=progress)
    results: dict[str, dict] = {}
    samples: dict[str, list] = {}
    item_values: dict[str, dict[str, list[float]]] = {}
    for spec in specs:
        _seed_all(seed)
        t0 = time.time()
        docs = spec.load(eval_dir) if eval_dir is not None else spec.load(Path("."))
        all_docs = docs
        if limit is not None:
            docs = docs[:limit]
        k = spec.default_fewshot if num_fewshot is None else num_fewshot
        prefixes = _fewshot_prefixes(spec, all_docs, docs, k, eval_dir)
        runner = {"multiple_choice": _run_mc, "loglikelihood": _run_loglik, "rolling": _run_rolling,
                  "generate": _run_generate}[spec.kind]
        entry, values, task_samples = runner(spec, docs, prefixes, scorer, stride=stride)
        entry["config"].update({
            "kind": spec.kind, "num_fewshot": k, "file": str(spec.path(eval_dir) if eval_dir else spec.filename),
            "lm_eval_task": spec.lm_eval_name or None, "max_length": scorer.max_length,
            "shared_prefix": scorer.share_prefix, "seconds": round(time.time() - t0, 2), "backend": "builtin",
        })
        if spec.notes:
            entry["config"]["notes"] = spec.notes
        results[spec.name] = entry
        item_values[spec.name] = values
        if log_samples:
            samples[spec.name] = task_samples
        log.info("%s: %s (n=%d)", spec.name, _fmt_metrics(entry["metrics"]), entry["n"])
    out = {"results": results, "groups": _aggregate_groups(results, item_values),
           "config": {"data_dir": str(eval_dir) if eval_dir else None, "max_length": scorer.max_length}}
    if log_samples:
        out["samples"] = samples
    return out


def _fmt_metrics(m: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float))


def _fewshot_prefixes(spec: TaskSpec, all_docs: list, docs: list, k: int, eval_dir: Path | None) -> list[str]:
    """Per-item prompt prefix: task description + `k` solved examples, lm-eval's layout."""
    if spec.kind == "rolling":
        return [""] * len(docs)
    if k == 0:
        return [spec.description] * len(docs)
    pool = spec.load_fewshot(eval_dir) if eval_dir is not None else None
    if pool is not None:  # a dedicated few-shot split: the first k examples (lm-eval `first_n`)
        if len(pool) < k:
            raise CBOPruneError(f"task {spec.name} has {len(pool)} few-shot examples, fewer than "
                                f"--num-fewshot {k}: lower --num-fewshot")
        shots = "".join(spec.fewshot_example(d) + spec.fewshot_delimiter for d in pool[:k])
        return [spec.description + shots] * len(docs)
    rnd = random.Random(FEWSHOT_SEED)  # same split as the items: sample k+1, drop the item itself
    out = []
    for doc in docs:
        picked = [d for d in rnd.sample(all_docs, min(k + 1, len(all_docs))) if d is not doc][:k]
        out.append(spec.description + "".join(spec.fewshot_example(d) + spec.fewshot_delimiter for d in picked))
    return out


def _entry(metric_values: dict[str, list[float]], n: int, extra_metrics: dict | None = None) -> dict:
    metrics, stderr = {}, {}
    for name, vals in metric_values.items():
        metrics[name], stderr[name] = M.mean_and_stderr(vals)
    if extra_metrics:
        metrics.update(extra_metrics)
    return {"metrics": metrics, "stderr": stderr, "n": n, "config": {}}


def _run_mc(spec: TaskSpec, docs: list, prefixes: list[str], scorer: Scorer, **_: Any):
    groups = []
    for doc, prefix in zip(docs, prefixes):
        if spec.contexts is not None:
            groups.append([(prefix + c, spec.target_delimiter + spec.target(doc)) for c in spec.contexts(doc)])
        else:
            groups.append([(prefix + spec.text(doc), spec.target_delimiter + c) for c in spec.choices(doc)])
    scored = scorer.loglikelihood_groups(groups, desc=spec.name)
    values: dict[str, list[float]] = {m: [] for m in spec.metrics}
    samples = []
    for i, (doc, res) in enumerate(zip(docs, scored)):
        lls = [r.logprob for r in res]
        gold = spec.gold(doc)
        pred, pred_norm = M.mc_predictions(lls, spec.choices(doc))
        values["acc"].append(float(pred == gold))
        if "acc_norm" in values:
            values["acc_norm"].append(float(pred_norm == gold))
        samples.append({"index": i, "gold": gold, "pred": pred, "pred_norm": pred_norm, "lls": lls})
    return _entry(values, len(docs)), values, samples


def _run_loglik(spec: TaskSpec, docs: list, prefixes: list[str], scorer: Scorer, **_: Any):
    groups = [[(p + spec.text(d), spec.target_delimiter + spec.target(d))] for d, p in zip(docs, prefixes)]
    scored = [g[0] for g in scorer.loglikelihood_groups(groups, desc=spec.name)]
    lls = [r.logprob for r in scored]
    values = {"acc": [float(r.is_greedy) for r in scored]}
    entry = _entry(values, len(docs), {"perplexity": math.exp(-float(np.mean(lls)))})
    entry["stderr"]["perplexity"] = None
    samples = [{"index": i, "ll": r.logprob, "is_greedy": r.is_greedy} for i, r in enumerate(scored)]
    return entry, values, samples


def _run_rolling(spec: TaskSpec, docs: list, prefixes: list[str], scorer: Scorer, *, stride: int | None = None):
    if stride is not None and not 1 <= stride <= scorer.max_length:
        raise CBOPruneError(f"stride {stride} must be between 1 and the context length {scorer.max_length}: "
                            "lower --stride or raise --max-length")
    is_wiki = spec.name == "wikitext"
    texts = [wikitext_detokenize(d) for d in docs] if is_wiki else list(docs)
    scored = scorer.rolling_loglikelihood(texts, stride=stride, desc=spec.name)
    ll = sum(r.logprob for r in scored)
    n_tokens = sum(r.n_tokens for r in scored)
    n_words = sum(len(re.split(r"\s+", d)) for d in docs)  # lm-eval counts words before detokenizing
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    metrics = {"word_perplexity": math.exp(-ll / n_words), "byte_perplexity": math.exp(-ll / n_bytes),
               "bits_per_byte": -ll / n_bytes / math.log(2), "token_perplexity": math.exp(-ll / n_tokens)}
    entry = {"metrics": {m: metrics[m] for m in spec.metrics}, "stderr": {m: None for m in spec.metrics},
             "n": len(docs), "config": {"context_length": scorer.max_length, "stride": stride or scorer.max_length,
                                        "tokens": n_tokens, "words": n_words, "bytes": n_bytes}}
    samples = [{"index": i, "ll": r.logprob, "tokens": r.n_tokens} for i, r in enumerate(scored)]
    return entry, {}, samples


def _run_generate(spec: TaskSpec, docs: list, prefixes: list[str], scorer: Scorer, **_: Any):
    prompts = [p + spec.text(d) for d, p in zip(docs, prefixes)]
    outputs = scorer.generate_until(prompts, spec.until, spec.max_gen_toks, desc=spec.name)
    score = M.gsm8k_scores if spec.answer_type == "gsm8k" else M.bbh_scores
    values: dict[str, list[float]] = {m: [] for m in spec.metrics}
    samples = []
    for i, (doc, out) in enumerate(zip(docs, outputs)):
        s = score(out, spec.target(doc))
        for m in spec.metrics:
            values[m].append(s[m])
        samples.append({"index": i, "output": out, **s})
    entry = _entry(values, len(docs))
    entry["config"]["generation"] = {"until": list(spec.until), "max_gen_toks": spec.max_gen_toks,
                                     "do_sample": False}
    return entry, values, samples


def _aggregate_groups(results: dict, item_values: dict) -> dict:
    """Group scores (mmlu, bbh): the mean over all items of the member tasks evaluated."""
    groups = {}
    for group, members in GROUPS.items():
        present = [m for m in members if m in results]
        if not present:
            continue
        metric_names = list(item_values[present[0]])
        values = {name: [v for m in present for v in item_values[m].get(name, [])] for name in metric_names}
        entry = _entry(values, sum(results[m]["n"] for m in present))
        entry["config"] = {"tasks": len(present), "of": len(members), "aggregation": "mean over items"}
        groups[group] = entry
    return groups
