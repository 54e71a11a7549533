"""Built-in evaluator vs lm-eval-harness on the same items, in one run: speed and agreement.

    python benchmarks/eval_speed.py --limit 200 --out eval_speed.json

For each task (default: arc_easy, hellaswag, piqa, winogrande) both backends score the first
`--limit` items of the local data on the same in-memory model (the built-in evaluator first,
then lm-eval, task by task, after one warm-up each). Printed per task: items per second of both
and their ratio, how often both pick the same answer (acc and acc_norm), and the accuracy
difference. Wall time is what a user waits; the process's CPU time is also reported because
on a shared machine other processes' load shifts wall time between the two phases (use
`--threads 1` there). WikiText perplexity is compared on `--ppl-docs` articles. Exit status 1 when an
acceptance figure is missed (agreement < 99%, |acc diff| > 0.5 points, perplexity > 0.5% apart,
or, with --min-speedup, a slower ratio).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from cboprune.evaluation import evaluate
from cboprune.models import load_model

log = logging.getLogger(__name__)


def _timed(model, tok, task, backend, **kw) -> tuple[dict, float, float]:
    """Run one backend; return (results, wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate(model, tok, [task], backend=backend, log_samples=True, **kw)
    return res, time.perf_counter() - t0, time.process_time() - c0


def compare_task(model, tok, task: str, limit: int, batch_size: int, data_dir: str | None) -> dict:
    kw = {"limit": limit, "batch_size": batch_size, "data_dir": data_dir}
    b, tb, cb = _timed(model, tok, task, "builtin", progress=False, **kw)
    lmr, tl, cl = _timed(model, tok, task, "lm-eval", **kw)
    sb, sl = b["samples"][task], lmr["samples"][task]
    n = len(sb)
    same = sum(x["pred"] == y["pred"] for x, y in zip(sb, sl)) / n
    same_norm = sum(x["pred_norm"] == y["pred_norm"] for x, y in zip(sb, sl)) / n
    max_ll = max(abs(p - q) for x, y in zip(sb, sl) for p, q in zip(x["lls"], y["lls"]))
    row = {"task": task, "n": n, "builtin_s": tb, "lm_eval_s": tl, "builtin_items_per_s": n / tb,
           "lm_eval_items_per_s": n / tl, "speedup": tl / tb, "builtin_cpu_s": cb, "lm_eval_cpu_s": cl, "cpu_speedup": cl / cb, "same_pred": same, "same_pred_norm": same_norm,
           "max_abs_ll_diff": max_ll}
    for m in b["results"][task]["metrics"]:
        row[f"{m}_builtin"] = b["results"][task]["metrics"][m]
        row[f"{m}_lm_eval"] = lmr["results"][task]["metrics"][m]
    return row


def compare_ppl(model, tok, docs: int, max_length: int, data_dir: str | None) -> dict:
    kw = {"limit": docs, "max_length": max_length, "data_dir": data_dir}
    b, tb, cb = _timed(model, tok, "wikitext", "builtin", progress=False, **kw)
    lmr, tl, cl = _timed(model, tok, "wikitext", "lm-eval", **kw)
    wb = b["results"]["wikitext"]["metrics"]["word_perplexity"]
    wl = lmr["results"]["wikitext"]["metrics"]["word_perplexity"]
    return {"task": "wikitext", "n": docs, "max_length": max_length, "tokens": b["results"]["wikitext"]["config"]["tokens"],
            "builtin_s": tb, "lm_eval_s": tl, "speedup": tl / tb, "cpu_speedup": cl / cb, "word_ppl_builtin": wb, "word_ppl_lm_eval": wl,
            "rel_diff": abs(wb - wl) / wl}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--tasks", default="arc_easy,hellaswag,piqa,winogrande")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ppl-docs", type=int, default=4, help="WikiText articles (0: skip perplexity)")
    ap.add_argument("--ppl-max-length", type=int, default=1024)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--min-speedup", type=float, default=None)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    model, tok = lm.model, lm.tokenizer
    # warm-up both backends (first-call costs: imports, allocator, lm-eval task indexing)
    evaluate(model, tok, ["arc_easy"], limit=2, progress=False, data_dir=args.data_dir)
    evaluate(model, tok, ["arc_easy"], limit=2, backend="lm-eval", data_dir=args.data_dir)
    rows = []
    for task in [t for t in args.tasks.split(",") if t]:
        row = compare_task(model, tok, task, args.limit, args.batch_size, args.data_dir)
        rows.append(row)
        print(f"{task:12s} n={row['n']:4d}  builtin {row['builtin_items_per_s']:6.2f} it/s  lm-eval "
              f"{row['lm_eval_items_per_s']:6.2f} it/s  x{row['speedup']:.2f} (CPU time x{row['cpu_speedup']:.2f})  same answer {row['same_pred']:.1%} "
              f"(norm {row['same_pred_norm']:.1%})  acc {row['acc_builtin']:.4f} vs {row['acc_lm_eval']:.4f}  "
              f"max |dll| {row['max_abs_ll_diff']:.1e}", flush=True)
    ppl = None
    if args.ppl_docs:
        ppl = compare_ppl(model, tok, args.ppl_docs, args.ppl_max_length, args.data_dir)
        print(f"wikitext     docs={ppl['n']} ({ppl['tokens']} tokens, L={ppl['max_length']})  word ppl "
              f"{ppl['word_ppl_builtin']:.4f} vs {ppl['word_ppl_lm_eval']:.4f} ({ppl['rel_diff']:.3%})  "
              f"x{ppl['speedup']:.2f}", flush=True)
    total_b = sum(r["builtin_s"] for r in rows)
    total_l = sum(r["lm_eval_s"] for r in rows)
    items = sum(r["n"] for r in rows)
    cpu_b = sum(r["builtin_cpu_s"] for r in rows)
    cpu_l = sum(r["lm_eval_cpu_s"] for r in rows)
    summary = {"items": items, "builtin_items_per_s": items / total_b, "lm_eval_items_per_s": items / total_l,
               "speedup": total_l / total_b, "cpu_speedup": cpu_l / cpu_b, "threads": torch.get_num_threads()}
    print(f"overall: {items} items, builtin {summary['builtin_items_per_s']:.2f} it/s, lm-eval "
          f"{summary['lm_eval_items_per_s']:.2f} it/s, speedup x{summary['speedup']:.2f} "
          f"(CPU time x{summary['cpu_speedup']:.2f}, {summary['threads']} threads)")
    ok = all(r["same_pred"] >= 0.99 and abs(r["acc_builtin"] - r["acc_lm_eval"]) <= 0.005 for r in rows)
    ok = ok and (ppl is None or ppl["rel_diff"] <= 0.005)
    if args.min_speedup is not None:
        ok = ok and summary["speedup"] >= args.min_speedup
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"tasks": rows, "perplexity": ppl, "summary": summary, "pass": ok}, f, indent=2)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
