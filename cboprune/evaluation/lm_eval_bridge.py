"""Run lm-evaluation-harness itself on an in-memory model and the local data.

The package ships lm-eval task YAMLs (`cboprune/evaluation/tasks/cbo_*.yaml`) with the same
prompts as the built-in evaluator. At run time they are copied into a temporary include
directory with the data-file paths filled in (files that are not JSON lines — HellaSwag's bz2
text, MMLU's CSVs, BBH, WikiText — are first converted there to JSON lines by the same readers
the built-in evaluator uses), and lm-eval's `TaskManager(include_path=...)` loads them. Task
names that are not cboprune tasks are passed to lm-eval unchanged (its own task configs, the
user's YAMLs from `--include-path`, hub datasets when online); `plan.plan_tasks` decides which.
lm-eval is a dependency, never vendored.
"""

from __future__ import annotations

import json
import logging
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from cboprune.core.errors import CBOPruneError
from cboprune.evaluation import metrics as M
from cboprune.evaluation.plan import TaskPlan, hub_access
from cboprune.evaluation.scorer import default_max_length
from cboprune.evaluation.tasks import GROUPS, TASKS, TaskSpec

log = logging.getLogger(__name__)

PREFIX = "cbo_"
_CONVERTED = {"hellaswag", "wikitext"}  # besides the mmlu_* and bbh_* families


def _template(name: str) -> str:
    return resources.files("cboprune.evaluation").joinpath("tasks", f"{name}.yaml").read_text(encoding="utf-8")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_task_yamls(specs: list[TaskSpec], eval_dir: Path, out_dir: Path) -> dict[str, str]:
    """Write lm-eval YAMLs for `specs` into `out_dir`; return {cboprune name: lm-eval name}."""
    names = {}
    for spec in specs:
        subs: dict[str, str] = {}
        if spec.group == "mmlu":
            subject = spec.name[len("mmlu_"):]
            text = _template("cbo_mmlu")
            subs["@SUBJECT@"] = subject
            subs['"@DESCRIPTION@"'] = json.dumps(spec.description)
            subs['"@FILE@"'] = json.dumps(str(_write_jsonl(out_dir / f"{spec.name}_test.jsonl", spec.load(eval_dir))))
            subs['"@FEWSHOT_FILE@"'] = json.dumps(str(_write_jsonl(out_dir / f"{spec.name}_dev.jsonl",
                                                                 spec.load_fewshot(eval_dir))))
        elif spec.group == "bbh":
            text = _template("cbo_bbh")
            subs["@SUBTASK@"] = spec.name[len("bbh_"):]
            subs['"@FILE@"'] = json.dumps(str(_write_jsonl(out_dir / f"{spec.name}.jsonl", spec.load(eval_dir))))
        elif spec.name in TASKS:
            text = _template(PREFIX + spec.name)
            if spec.name == "wikitext":
                records = [{"page": p} for p in spec.load(eval_dir)]
                path = _write_jsonl(out_dir / "wikitext.jsonl", records)
                (out_dir / "cbo_utils.py").write_text(
                    "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, "
                    "wikitext_detokenizer  # noqa: F401\n", encoding="utf-8")
            elif spec.name in _CONVERTED:
                path = _write_jsonl(out_dir / f"{spec.name}.jsonl", spec.load(eval_dir))
            else:
                spec.load(eval_dir)  # validate the records with a one-line error before lm-eval sees them
                path = spec.path(eval_dir)
            subs['"@FILE@"'] = json.dumps(str(path))
        else:
            raise CBOPruneError(f"task {spec.name!r} has no lm-eval definition: run it with --backend builtin")
        for key, value in subs.items():
            text = text.replace(key, value)
        (out_dir / f"{PREFIX}{spec.name}.yaml").write_text(text, encoding="utf-8")
        names[spec.name] = PREFIX + spec.name
    return names


def evaluate_with_lm_eval(model: torch.nn.Module, tokenizer: Any, plan: TaskPlan, *,
                          limit: int | None, num_fewshot: int | None, batch_size: int, seed: int,
                          max_length: int | None, log_samples: bool, apply_chat_template: bool = False) -> dict:
    """lm-eval's `simple_evaluate` through `HFLM` on the in-memory model, for the plan's lm-eval tasks.

    Returns cboprune's result format with lm-eval's own output (samples dropped) under `lm_eval`.
    The context length is `max_length` when given; otherwise the built-in evaluator's default
    when cboprune tasks run here (both backends then score the same windows) and lm-eval's own
    default when only lm-eval tasks run (as `lm_eval --model hf` would).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM


    if max_length is None and plan.local_lm_eval:
        max_length = default_max_length(model, tokenizer)
    with tempfile.TemporaryDirectory(prefix="cboprune-lm-eval-") as tmp:
        names = write_task_yamls(plan.local_lm_eval, plan.eval_dir, Path(tmp)) if plan.local_lm_eval else {}
        manager = _manager_for(plan, tmp if names else None)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        with hub_access(plan.hub_online is not False):
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(names.values()) + plan.lm_eval, task_manager=manager, limit=limit,
                num_fewshot=num_fewshot, log_samples=log_samples, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=1234, bootstrap_iters=1000,
                apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template,
            )
    result = _convert(out, names, plan.local_lm_eval, limit, log_samples, plan.eval_dir, lm.max_length)
    raw = {k: v for k, v in out.items() if k != "samples"}
    raw["lm_eval_version"] = _version()
    result["lm_eval"] = raw
    return result


def _manager_for(plan: TaskPlan, local_dir: str | None) -> Any:
    """The plan's TaskManager when it serves (no local YAMLs to add), else one that also indexes them."""
    from lm_eval.tasks import TaskManager

    if local_dir is None and plan.manager is not None:
        return plan.manager
    paths = [p for p in (local_dir, str(plan.include_path) if plan.include_path else None) if p]
    # lm-eval's own ~15k task configs take ~20 s to index: only when the plan needed them.
    defaults = bool(plan.lm_eval) and plan.lm_eval_defaults
    return TaskManager(include_path=paths or None, include_defaults=defaults)


def _convert(out: dict, names: dict[str, str], specs: list[TaskSpec], limit: int | None,
             log_samples: bool, data_dir: Any, max_length: int) -> dict:
    back = {v: k for k, v in names.items()}
    spec_by_name = {s.name: s for s in specs}
    results: dict[str, dict] = {}
    samples: dict[str, list] = {}
    for lm_name, res in out["results"].items():
        name = back.get(lm_name, lm_name)
        metrics, stderr = {}, {}
        for key, value in res.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            label = metric if filt == "none" else f"{metric}_{filt.replace('-match', '').replace('-extract', '')}"
            metrics[label] = float(value)
            err = res.get(f"{metric}_stderr,{filt}")
            stderr[label] = float(err) if isinstance(err, (int, float)) else None
        n = out.get("n-samples", {}).get(lm_name, {}).get("effective")
        cfg = {"lm_eval_task": lm_name, "num_fewshot": out.get("n-shot", {}).get(lm_name)}
        cfg["backend"] = "lm-eval"
        results[name] = {"metrics": metrics, "stderr": stderr, "n": n, "config": cfg}
        if log_samples and lm_name in out.get("samples", {}):
            samples[name] = _convert_samples(out["samples"][lm_name], spec_by_name.get(name))
    groups = {}
    for group, members in GROUPS.items():
        present = [m for m in members if m in results and results[m]["n"]]
        if present:
            total = sum(results[m]["n"] for m in present)
            metrics = {k: sum(results[m]["metrics"][k] * results[m]["n"] for m in present) / total
                       for k in results[present[0]]["metrics"]}
            groups[group] = {"metrics": metrics, "stderr": {}, "n": total,
                             "config": {"tasks": len(present), "of": len(members),
                                        "aggregation": "mean over items"}}
    result = {"results": results, "groups": groups,
              "config": {"data_dir": str(data_dir) if data_dir else None, "max_length": max_length,
                         "lm_eval_version": _version()}}
    if log_samples:
        result["samples"] = samples
    return result


def _convert_samples(raw: list[dict], spec: TaskSpec | None) -> list[dict]:
    rows = []
    for s in sorted(raw, key=lambda s: s["doc_id"]):
        entry: dict[str, Any] = {"index": s["doc_id"]}
        resps = s.get("filtered_resps") or s.get("resps")
        if spec is not None and spec.kind == "multiple_choice":
            lls = [float(r[0]) if isinstance(r, (list, tuple)) else float(r) for r in resps]
            pred, pred_norm = M.mc_predictions(lls, spec.choices(s["doc"]))
            entry.update({"gold": spec.gold(s["doc"]), "pred": pred, "pred_norm": pred_norm, "lls": lls})
        elif spec is not None and spec.kind == "loglikelihood":
            entry.update({"ll": float(resps[0][0]), "is_greedy": bool(resps[0][1])})
        else:  # an lm-eval task: its document and responses as lm-eval logged them
            entry.update({"doc": s.get("doc"), "target": s.get("target"), "response": resps})
            if resps and all(isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[1], bool) for r in resps):
                entry["lls"] = [float(r[0]) for r in resps]
        rows.append(entry)
    return rows


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # noqa: BLE001
        return "unknown"
