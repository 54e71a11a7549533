"""`cboprune eval`: arguments and command, wired into the main CLI as a subcommand.

    cboprune eval default --tasks arc_easy,hellaswag --limit 200 --output out/eval
    cboprune eval ./pruned --tasks wikitext,file:notes.txt --max-length 1024
    cboprune eval default --tasks arc_easy --backend lm-eval   # lm-eval-harness itself
"""

from __future__ import annotations

import argparse
import logging

from cboprune.errors import CBOPruneError

log = logging.getLogger(__name__)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `eval` subcommand's arguments on `parser`."""
    parser.add_argument("model", nargs="?", default="default", metavar="MODEL_OR_CHECKPOINT",
                        help="'default', a checkpoint directory, a .gguf file or a hub id (default: default)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated: arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, "
                             "lambada_openai, wikitext, gsm8k, mmlu (or mmlu_<subject>), bbh (or bbh_<task>), "
                             "file:PATH (perplexity of a text file)")
    parser.add_argument("--list-tasks", action="store_true", help="print the task names and exit")
    parser.add_argument("--limit", type=int, default=None, help="first N items per task (documents for perplexity)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default: 32)")
    parser.add_argument("--backend", choices=("builtin", "lm-eval"), default="builtin",
                        help="built-in evaluator (fast) or lm-eval-harness itself (default: builtin)")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding eval/ (default: $CBOPRUNE_DATA_DIR, then ../shared/data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=None,
                        help="context window in tokens (default: the model's, capped at 2048)")
    parser.add_argument("--stride", type=int, default=None,
                        help="perplexity stride in tokens (default: --max-length, disjoint windows as lm-eval)")
    parser.add_argument("--output", "-o", default=None,
                        help="write OUTPUT.json and OUTPUT.md (a directory: results.json/results.md)")
    parser.add_argument("--log-samples", action="store_true", help="store per-item predictions in the JSON")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_eval_command(args: argparse.Namespace) -> int:
    """Run `cboprune eval`; print the markdown table; return the exit status (0)."""
    from cboprune.evaluation.results import markdown_table, write_results
    from cboprune.evaluation.runner import evaluate
    from cboprune.evaluation.tasks import available_names, resolve_tasks

    if args.list_tasks:
        print("\n".join(available_names()))
        return 0
    if not args.tasks:
        raise CBOPruneError("no task given: pass --tasks, e.g. --tasks arc_easy,wikitext (--list-tasks lists them)")
    if args.backend == "builtin":
        resolve_tasks(args.tasks)  # unknown names fail before the model loads
    if args.stride is not None and args.max_length is not None and not 1 <= args.stride <= args.max_length:
        raise CBOPruneError(f"--stride {args.stride} must be between 1 and --max-length {args.max_length}")
    from cboprune.models import load_model

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    results = evaluate(lm.model, lm.tokenizer, args.tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, backend=args.backend, data_dir=args.data_dir, seed=args.seed,
                       max_length=args.max_length, stride=args.stride, log_samples=args.log_samples,
                       progress=not args.no_progress)
    results["config"]["model"] = args.model
    print(markdown_table(results))
    if args.output:
        json_path, md_path = write_results(results, args.output)
        print(f"wrote {json_path} and {md_path}")
    return 0
