"""`cboprune eval`: arguments and command, wired into the main CLI as a subcommand.

    cboprune eval default --tasks arc_easy,hellaswag --limit 200 --output out/eval
    cboprune eval ./pruned --tasks wikitext,file:notes.txt --max-length 1024
    cboprune eval default --tasks arc_easy --backend lm-eval      # lm-eval-harness itself
    cboprune eval ./pruned --tasks my_task --include-path my_tasks/   # the user's lm-eval YAML
"""

from __future__ import annotations

import argparse
import logging

from cboprune.config import option_default, option_help
from cboprune.errors import CBOPruneError

log = logging.getLogger(__name__)


def add_include_path_argument(parser: argparse.ArgumentParser) -> None:
    """`--include-path DIR` (for eval, compare and study alike)."""
    parser.add_argument("--include-path", default=None, metavar="DIR",
                        help="folder of your own lm-eval task YAMLs (as lm_eval --include_path); "
                             "their task names can then be given to --tasks")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `eval` subcommand's arguments on `parser`."""
    parser.add_argument("model", nargs="?", default="default", metavar="MODEL_OR_CHECKPOINT",
                        help="'default', a checkpoint directory, a .gguf file or a hub id (default: default)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated. Built-in: arc_easy, arc_challenge, hellaswag, piqa, winogrande, "
                             "boolq, lambada_openai, wikitext, gsm8k, mmlu (or mmlu_<subject>), bbh (or "
                             "bbh_<task>), file:PATH (perplexity of a text file); any other lm-eval task name")
    parser.add_argument("--list-tasks", action="store_true", help="print the built-in task names and exit")
    parser.add_argument("--limit", type=int, default=None, help="first N items per task (documents for perplexity)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--batch-size", type=int, default=option_default("eval_batch_size"),
                        help=option_help("eval_batch_size"))
    parser.add_argument("--backend", choices=("auto", "builtin", "lm-eval"), default="auto",
                        help="auto: the built-in evaluator (fast) for the tasks it implements, lm-eval for the "
                             "rest; builtin; lm-eval: lm-eval-harness for every task (default: auto)")
    add_include_path_argument(parser)
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="render prompts (and few-shot turns) with the tokenizer's chat template (lm-eval)")
    parser.add_argument("--data-dir", default=None, help=option_help("data_dir"))
    parser.add_argument("--seed", type=int, default=option_default("seed"), help=option_help("seed"))
    parser.add_argument("--max-length", type=int, default=None,
                        help="context window in tokens (default: the model's, capped at 2048)")
    parser.add_argument("--stride", type=int, default=None,
                        help="perplexity stride in tokens (default: --max-length, disjoint windows as lm-eval)")
    parser.add_argument("--output", "-o", default=None,
                        help="write OUTPUT.json (lm-eval's results schema + a 'cboprune' summary) and OUTPUT.md")
    parser.add_argument("--overwrite", action="store_true", help="replace existing OUTPUT.json / OUTPUT.md")
    parser.add_argument("--log-samples", action="store_true", help="store per-item predictions in the JSON")
    parser.add_argument("--device", default=None, help=option_help("device"))
    parser.add_argument("--dtype", default=option_default("dtype"), help=option_help("dtype"))
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run_eval_command(args: argparse.Namespace) -> int:
    """Run `cboprune eval`; print the markdown table; return the exit status (0)."""
    from cboprune.evaluation.plan import plan_tasks
    from cboprune.evaluation.results import markdown_table, output_paths, write_results
    from cboprune.evaluation.runner import check_eval_options, evaluate
    from cboprune.evaluation.tasks import available_names

    if args.list_tasks:
        print("\n".join(available_names()))
        return 0
    if not args.tasks:
        raise CBOPruneError("no task given: pass --tasks, e.g. --tasks arc_easy,wikitext (--list-tasks lists them)")
    # Everything checkable is checked before the model loads.
    check_eval_options(limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                       max_length=args.max_length, stride=args.stride)
    if args.output:
        output_paths(args.output, overwrite=args.overwrite)
    plan = plan_tasks(args.tasks, backend=args.backend, include_path=args.include_path, data_dir=args.data_dir,
                      apply_chat_template=args.apply_chat_template)
    from cboprune.models import load_model

    from cboprune.distributed import pick_device

    lm = load_model(args.model, dtype=args.dtype, device=pick_device(args.device))
    results = evaluate(lm.model, lm.tokenizer, plan, limit=args.limit, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, backend=args.backend, seed=args.seed,
                       max_length=args.max_length, stride=args.stride, log_samples=args.log_samples,
                       progress=not args.no_progress, apply_chat_template=args.apply_chat_template)
    results["config"]["model"] = args.model
    print(markdown_table(results))
    if args.output:
        json_path, md_path = write_results(results, args.output, overwrite=args.overwrite)
        print(f"wrote {json_path} and {md_path}")
    return 0
