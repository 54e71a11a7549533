"""Held-out domains: how a pruned model does on text it was not calibrated on, with standard errors.

    --domains calib,alpaca,c4,wiki,mmlu,arc_easy,hellaswag,piqa,winogrande   (or any data file)

Three kinds of domain, each scored per item so that every number has a standard error:

- records (`alpaca`, `c4`, `calib`, or a .jsonl/.json/.txt path): records of a calibration-style
  file that no calibration with the same seed reads. A calibration shuffles the file's records
  with its seed and reads a prefix of that order (`info["records_used"]`); a domain takes its
  records from the other end of the same order, so the two never overlap while
  used + limit <= total (`check_heldout` says so before any selection). Chat records are
  rendered with the model's template. Score: `loss`, the mean over records of the per-token NLL
  (nats), and `token_loss`, the token-weighted one (log of the token perplexity).
- documents (`wiki`): WikiText-2 test paragraphs of at least 200 characters, in file order (never a
  calibration source: the `wiki` calibration is the separate wiki_demo.txt). Same scores.
- choice (`mmlu`, `arc_easy`, `arc_challenge`, `hellaswag`, `piqa`, `winogrande`): zero-shot items
  (MMLU: round-robin over its 57 subjects, with each subject's description), scored by the
  log-likelihood of the gold answer (`gold_ll`, nats, higher is better), the same normalized over
  the choices (`gold_choice_lp`, log P(gold | one of the choices)), its rank among the choices
  (`gold_rank`, 1 = first), and `acc`. Far less noisy than accuracy at a few hundred items.

Every document is cut to its first `DOC_CHARS` characters, so a domain's cost is predictable.
`limit` items per domain (default 200).
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cboprune.data.calibration import (
    check_data,
    read_records,
    records_to_messages,
    render_chat,
)
from cboprune.data.mix import is_mix, parse_mix
from cboprune.core.errors import CBOPruneError
from cboprune.evaluation.data import read_text, resolve_eval_dir, wikitext_detokenize
from cboprune.evaluation.metrics import mean_and_stderr
from cboprune.evaluation.scorer import Scorer
from cboprune.evaluation.tasks import resolve_tasks
from cboprune.report.tables import markdown_table

log = logging.getLogger(__name__)

DOC_CHARS = 2000
MIN_PARAGRAPH_CHARS = 200
DEFAULT_LIMIT = 200
#: named domains: kind and file under the data folder (`calib/...`) or task name
NAMED = {
    "alpaca": ("records", "calib/alpaca_en_demo.json"),
    "c4": ("records", "calib/c4_demo.jsonl"),
    "wiki": ("documents", "eval/wikitext2_test.raw"),
    "mmlu": ("choice", "mmlu"),
    "arc_easy": ("choice", "arc_easy"),
    "arc_challenge": ("choice", "arc_challenge"),
    "hellaswag": ("choice", "hellaswag"),
    "piqa": ("choice", "piqa"),
    "winogrande": ("choice", "winogrande"),
}
#: the score a table shows for each kind, and whether lower is better
HEADLINE = {"records": ("loss", True), "documents": ("loss", True), "choice": ("gold_ll", False)}


@dataclass
class Domain:
    name: str
    kind: str  # records, documents, choice
    path: Path | None = None  # records / documents
    tasks: list[Any] = field(default_factory=list)  # choice: TaskSpecs

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "path": str(self.path) if self.path else None,
                "tasks": len(self.tasks) or None}


def _base_dir(data_dir: str | None) -> Path:
    return resolve_eval_dir(data_dir).parent


def resolve_domains(spec: str | list[str], *, data: str | None = None, data_dir: str | None = None) -> list[Domain]:
    """The domains of `spec` (comma-separated), every file read once so that a bad one fails now.
    `calib` stands for the calibration's own files (`data`, each source of a mix)."""

    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n and n.strip()]
    if not names:
        raise CBOPruneError("--domains is empty: pass domain names, e.g. --domains c4,wiki,arc_easy")
    out: list[Domain] = []
    base: Path | None = None
    for name in names:
        if name == "calib":
            sources = [s.spec for s in parse_mix(data) if not s.generated] if is_mix(data) else (
                [data] if data and Path(data).expanduser().is_file() else [])
            if not sources:
                raise CBOPruneError("--domains calib needs calibration files (--data FILE or a mix of files): "
                                    "model-generated calibration has no held-out records")
            out += [Domain(f"calib:{Path(s).stem}", "records", Path(s).expanduser().resolve()) for s in sources]
            continue
        if name in NAMED:
            kind, where = NAMED[name]
            if kind == "choice":
                out.append(Domain(name, kind, tasks=resolve_tasks(where)))
                continue
            base = base or _base_dir(data_dir)
            path = base / where
        else:
            path = Path(name).expanduser()
            kind = "records"
            if not path.is_file():
                import difflib

                close = difflib.get_close_matches(name, list(NAMED) + ["calib"], n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                raise CBOPruneError(f"unknown domain {name!r}: {hint}use {', '.join(['calib', *NAMED])} or a "
                                    ".jsonl/.json/.txt file")
        if not path.is_file():
            raise CBOPruneError(f"domain {name}: {path} not found; pass --data-dir (the folder holding calib/ and eval/)")
        if kind == "records":
            check_data(str(path))
        out.append(Domain(name, kind, path.resolve()))
    seen = set()
    for d in out:
        if d.name in seen:
            raise CBOPruneError(f"domain {d.name} is listed twice in --domains")
        seen.add(d.name)
    return out


# ----------------------------------------------------------------------------- items

def heldout_records(path: Path, seed: int) -> list:
    """The file's records in the calibration's order (the same filter and seeded shuffle as
    `build_calibration`), reversed: domain records are taken from this end."""

    converted = records_to_messages(read_records(path), str(path))
    chats = [c for c in converted if not isinstance(c, str)]
    items = chats if chats else [c for c in converted if isinstance(c, str) and c.strip()]
    random.Random(seed).shuffle(items)
    return items[::-1]


def record_texts(domain: Domain, tokenizer, limit: int, seed: int) -> list[str]:
    items = heldout_records(domain.path, seed)[:limit]
    return [(c if isinstance(c, str) else render_chat(tokenizer, c))[:DOC_CHARS] for c in items]


def wiki_paragraphs(path: Path, limit: int) -> list[str]:
    text = read_text(path, "wiki").replace("\r\n", "\n")
    paragraphs = [p.strip() for p in text.split("\n") if len(p.strip()) >= MIN_PARAGRAPH_CHARS
                  and not re.match(r"^ ?=", p)]
    return [wikitext_detokenize(p)[:DOC_CHARS] for p in paragraphs[:limit]]


def choice_items(domain: Domain, eval_dir: Path, limit: int) -> list[tuple[Any, dict]]:
    """(task, item) pairs: the first `limit` items, round-robin over the tasks (MMLU's subjects)."""
    per_task = [(spec, spec.load(eval_dir)) for spec in domain.tasks]
    out, i = [], 0
    while len(out) < limit and any(i < len(docs) for _, docs in per_task):
        out += [(spec, docs[i]) for spec, docs in per_task if i < len(docs)]
        i += 1
    return out[:limit]


# ----------------------------------------------------------------------------- scoring

def _summary(values: dict[str, list[float]], extra: dict[str, float] | None = None) -> dict[str, Any]:
    metrics, stderr = {}, {}
    for name, vals in values.items():
        metrics[name], stderr[name] = mean_and_stderr(vals)
    metrics.update(extra or {})
    return {"metrics": metrics, "stderr": stderr, "n": len(next(iter(values.values()), []))}


def score_texts(scorer, texts: list[str]) -> dict[str, Any]:
    scored = scorer.rolling_loglikelihood(texts, desc="domain")
    per_doc = [-r.logprob / r.n_tokens for r in scored if r.n_tokens]
    tokens = sum(r.n_tokens for r in scored)
    # per-item values kept: two models scored on the same items differ far less than their
    # standard errors suggest, and `paired_difference` needs the pairs
    return {**_summary({"loss": per_doc}, {"token_loss": -sum(r.logprob for r in scored) / max(tokens, 1)}),
            "tokens": tokens, "items": per_doc}


def score_choices(scorer, items: list[tuple[Any, dict]]) -> dict[str, Any]:
    groups = []
    for spec, doc in items:
        if spec.contexts is not None:
            groups.append([(spec.description + c, spec.target_delimiter + spec.target(doc))
                           for c in spec.contexts(doc)])
        else:
            groups.append([(spec.description + spec.text(doc), spec.target_delimiter + c) for c in spec.choices(doc)])
    scored = scorer.loglikelihood_groups(groups, desc="domain")
    values: dict[str, list[float]] = {"gold_ll": [], "gold_choice_lp": [], "gold_rank": [], "acc": []}
    for (spec, doc), res in zip(items, scored):
        lls = [r.logprob for r in res]
        gold = lls[spec.gold(doc)]
        rank = 1 + sum(ll > gold for ll in lls)
        top = max(lls)
        values["gold_ll"].append(gold)
        # log P(gold | one of the choices): blind to the mass a model puts outside the choices, which
        # moves gold_ll on MMLU's one-letter answers (a pruned model can raise it by flattening)
        values["gold_choice_lp"].append(gold - top - math.log(sum(math.exp(ll - top) for ll in lls)))
        values["gold_rank"].append(float(rank))
        values["acc"].append(float(rank == 1))
    return {**_summary(values), "items": values["gold_ll"]}


def evaluate_domains(model, tokenizer, domains: list[Domain], *, limit: int = DEFAULT_LIMIT, batch_size: int = 32,
                     max_length: int | None = None, seed: int = 0, data_dir: str | None = None,
                     progress: bool = False) -> dict[str, dict[str, Any]]:
    """{domain: {"kind", "metrics", "stderr", "n", "seconds"}} for one model."""

    scorer = Scorer(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress)
    was_training = model.training
    model.eval()
    out = {}
    try:
        for d in domains:
            t0 = time.time()
            if d.kind == "choice":
                res = score_choices(scorer, choice_items(d, resolve_eval_dir(data_dir), limit))
            elif d.kind == "documents":
                res = score_texts(scorer, wiki_paragraphs(d.path, limit))
            else:
                res = score_texts(scorer, record_texts(d, tokenizer, limit, seed))
            out[d.name] = {"kind": d.kind, **res, "seconds": round(time.time() - t0, 2)}
            log.info("domain %s: %s (n = %d)", d.name, ", ".join(f"{k} {v:.4f}" for k, v in res["metrics"].items()),
                     res["n"])
    finally:
        model.train(was_training)
    return out


def check_heldout(domains: list[Domain], calibration, limit: int, heal_data: str | None = None) -> None:
    """Refuse a records domain whose held-out records could overlap those the calibration read (the
    same file, used + limit > total); warn when the healing trains on a domain's file."""

    info = calibration.info
    sources = info.get("sources") or [{"source": calibration.source, **info}]
    problems = []
    for d in domains:
        if d.kind != "records":
            continue
        for s in sources:
            src = Path(str(s.get("source", ""))).expanduser()
            if not src.is_file() or src.resolve() != d.path or "records_used" not in s:
                continue
            if s["records_used"] + limit > s["records_total"]:
                problems.append(f"domain {d.name}: the calibration read {s['records_used']} of the "
                                f"{s['records_total']} records of {d.path.name}, too many to hold out {limit} more")
        heal_files = [h.spec for h in parse_mix(heal_data)] if heal_data and "," in heal_data else [heal_data]
        if any(h and Path(h).expanduser().is_file() and Path(h).expanduser().resolve() == d.path for h in heal_files):
            log.warning("domain %s: the healing trains on %s, so its records are not held out after healing; "
                        "pass another --heal-data for a clean after-healing score", d.name, d.path.name)
    if problems:
        raise CBOPruneError("; ".join(problems) + ": lower --domain-limit or --n-samples")


# ----------------------------------------------------------------------------- tables

def headline(entry: dict[str, Any]) -> tuple[str, float, float | None, bool]:
    """(metric, value, stderr, lower is better) of a domain's result."""
    metric, lower = HEADLINE[entry["kind"]]
    return metric, float(entry["metrics"][metric]), entry["stderr"].get(metric), lower


def paired_difference(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float | None]:
    """(mean of a − b over the same items, its standard error) for a domain's headline score; the
    plain difference of the means without a standard error when either lacks per-item values."""

    xa, xb = a.get("items"), b.get("items")
    if not xa or not xb or len(xa) != len(xb):
        return headline(a)[1] - headline(b)[1], None
    return mean_and_stderr([p - q for p, q in zip(xa, xb)])


def text_loss_summary(domains: dict[str, dict[str, Any]]) -> tuple[float | None, str | None, float | None]:
    """(mean loss over the text domains, the worst one's name, its loss)."""
    losses = {n: float(e["metrics"]["loss"]) for n, e in domains.items() if e["kind"] in ("records", "documents")}
    if not losses:
        return None, None, None
    worst = max(losses, key=losses.get)
    return sum(losses.values()) / len(losses), worst, losses[worst]


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    _, value, err, _ = headline(entry)
    return f"{value:.3f}" + (f" ± {err:.3f}" if err is not None else "")


def domain_rows(rows: list[tuple[str, str, dict[str, dict[str, Any]] | None]]) -> tuple[list[str], list[list[str]]]:
    """A table: one row per (M, label, domains result), one column per domain, then the mean and the
    worst text domain. Text domains show `loss` (nats per token, lower is better), benchmarks
    `gold_ll` (nats, higher is better), each ± its standard error."""
    names: list[str] = []
    for _, _, doms in rows:
        names += [n for n in (doms or {}) if n not in names]
    kinds = {}
    for _, _, doms in rows:
        for n, e in (doms or {}).items():
            kinds[n] = e["kind"]
    header = ["M", "method", *[f"{n} ({HEADLINE[kinds[n]][0]})" for n in names], "mean text loss", "worst text domain"]
    table = []
    for m, label, doms in rows:
        doms = doms or {}
        mean, worst, worst_loss = text_loss_summary(doms)
        table.append([m, label, *[_cell(doms.get(n)) for n in names],
                      "—" if mean is None else f"{mean:.3f}",
                      "—" if worst is None else f"{worst} {worst_loss:.3f}"])
    return header, table


def domain_markdown(entries, baseline: dict[str, Any], label, heal_steps: list[int] | None = None) -> str:
    """Per-domain tables of a compare/study: before healing, and after each healing budget."""

    if not baseline.get("domains"):
        return ""
    text = ["## Held-out domains\n",
            "Text domains: mean per-token NLL of held-out records (nats, lower is better); benchmarks: "
            "mean log-likelihood of the gold answer (nats, higher is better); each ± its standard error "
            "over items. Mean and worst: over the text domains.\n", "### Before healing\n"]
    rows = [("0", "original", baseline["domains"])]
    rows += [(str(e.n_remove), label(e.method), e.eval.get("domains")) for e in entries if e.same_as is None]
    text.append(markdown_table(*domain_rows(rows)))
    for s in heal_steps or []:
        healed = [(str(e.n_remove), label(e.method), e.healed[s]["eval"].get("domains"))
                  for e in entries if e.same_as is None and s in e.healed]
        if healed:
            text += [f"### After {s} healing steps\n", markdown_table(*domain_rows(healed))]
    return "\n".join(text)
