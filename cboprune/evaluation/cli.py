"""`cboprune eval`: arguments and command, wired into the main CLI as a subcommand.

    cboprune eval default --tasks arc_easy,hellaswag --limit 200 --output out/eval
    cboprune eval ./pruned --tasks wikitext,file:notes.txt --max-length 1024
    cboprune eval default --tasks arc_easy --backend lm-eval      # lm-eval-harness itself
    cboprune eval ./pruned --tasks my_task --include-path my_tasks/   # the user's lm-eval YAML
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from cboprune.core.config import Config
from cboprune.core.errors import CBOPruneError
from cboprune.core.options import build, option, shared

log = logging.getLogger(__name__)


@dataclass(kw_only=True)  # options in the order --help shows them, required or not
class EvalOptions:
    """The settings of `cboprune eval` (flags and YAML keys are generated from these declarations)."""
    model: str = option("default", "'default', a checkpoint directory, a .gguf file or a hub id (default: default)",
                        positional=True, nargs="?", metavar="MODEL_OR_CHECKPOINT")
    tasks: str | None = option(None, "comma-separated. Built-in: arc_easy, arc_challenge, hellaswag, piqa, "
                                     "winogrande, boolq, lambada_openai, wikitext, gsm8k, mmlu (or mmlu_<subject>), "
                                     "bbh (or bbh_<task>), file:PATH (perplexity of a text file); any other lm-eval "
                                     "task name", "tasks")
    list_tasks: bool = option(False, "print the built-in task names and exit", "tasks", kind="flag")
    limit: int | None = option(None, "first N items per task (documents for perplexity)", "tasks", kind="int",
                               minimum=1)
    num_fewshot: int | None = option(None, "few-shot examples (default: the task's)", "tasks", kind="int", minimum=0)
    batch_size: int = shared(Config, "eval_batch_size", section="evaluation")
    backend: str = option("auto", "auto: the built-in evaluator (fast) for the tasks it implements, lm-eval for "
                                  "the rest; builtin; lm-eval: lm-eval-harness for every task (default: auto)",
                          "evaluation", choices=("auto", "builtin", "lm-eval"))
    include_path: str | None = shared(Config, "include_path", metavar="DIR", section="tasks")
    apply_chat_template: bool = option(False, "render prompts (and few-shot turns) with the tokenizer's chat "
                                              "template (lm-eval)", "evaluation", kind="flag")
    data_dir: str | None = shared(Config, "data_dir", section="tasks")
    seed: int = shared(Config, "seed", section="evaluation")
    max_length: int | None = shared(Config, "max_length")
    stride: int | None = option(None, "perplexity stride in tokens (default: --max-length, disjoint windows as "
                                      "lm-eval)", "evaluation", kind="int", minimum=1)
    output: str | None = option(None, "write OUTPUT.json (lm-eval's results schema + a 'cboprune' summary) and "
                                      "OUTPUT.md", "output", aliases=("-o",))
    overwrite: bool = option(False, "replace existing OUTPUT.json / OUTPUT.md", "output", kind="flag")
    log_samples: bool = option(False, "store per-item predictions in the JSON", "output", kind="flag")
    device: str | None = shared(Config, "device")
    dtype: str = shared(Config, "dtype")
    no_progress: bool = option(False, "hide progress bars", "output", kind="flag")


def run_eval_command(namespace: argparse.Namespace) -> int:
    """Run `cboprune eval`; print the markdown table; return the exit status (0)."""
    from cboprune.evaluation.plan import plan_tasks
    from cboprune.evaluation.results import markdown_table, output_paths, write_results
    from cboprune.evaluation.runner import check_eval_options, evaluate
    from cboprune.evaluation.tasks import available_names

    args = build(EvalOptions, namespace, "eval")
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

    from cboprune.core.distributed import pick_device

    lm = load_model(args.model, dtype=args.dtype, device=pick_device(args.device))
    results = evaluate(lm.model, lm.tokenizer, plan, limit=args.limit, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, backend=args.backend, seed=args.seed,
                       max_length=args.max_length, stride=args.stride, log_samples=args.log_samples,
                       progress=not (args.no_progress or getattr(namespace, "quiet", False)), apply_chat_template=args.apply_chat_template)
    results["config"]["model"] = args.model
    print(markdown_table(results))
    if args.output:
        json_path, md_path = write_results(results, args.output, overwrite=args.overwrite)
        print(f"wrote {json_path} and {md_path}")
    return 0
