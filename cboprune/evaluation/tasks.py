"""The task registry: every task's data file, prompt format, few-shot source and metrics.

Prompt formats are lm-eval-harness's (v0.4) task definitions, applied to the local files,
which are already in lm-eval's processed form. The same definitions generate the lm-eval task
YAMLs (`lm_eval_bridge`), so both backends score identical strings. Where the local data
differs from the hub data lm-eval would download, the difference is noted on the task.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cboprune.core.errors import CBOPruneError
from cboprune.evaluation import data as D

log = logging.getLogger(__name__)

MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology "
    "college_chemistry college_computer_science college_mathematics college_medicine college_physics "
    "computer_security conceptual_physics econometrics electrical_engineering elementary_mathematics "
    "formal_logic global_facts high_school_biology high_school_chemistry high_school_computer_science "
    "high_school_european_history high_school_geography high_school_government_and_politics "
    "high_school_macroeconomics high_school_mathematics high_school_microeconomics high_school_physics "
    "high_school_psychology high_school_statistics high_school_us_history high_school_world_history "
    "human_aging human_sexuality international_law jurisprudence logical_fallacies machine_learning "
    "management marketing medical_genetics miscellaneous moral_disputes moral_scenarios nutrition "
    "philosophy prehistory professional_accounting professional_law professional_medicine "
    "professional_psychology public_relations security_studies sociology us_foreign_policy virology "
    "world_religions"
).split()

BBH_SUBTASKS = (
    "boolean_expressions causal_judgement date_understanding disambiguation_qa dyck_languages "
    "formal_fallacies geometric_shapes hyperbaton logical_deduction_five_objects "
    "logical_deduction_seven_objects logical_deduction_three_objects movie_recommendation "
    "multistep_arithmetic_two navigate object_counting penguins_in_a_table "
    "reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks "
    "sports_understanding temporal_sequences tracking_shuffled_objects_five_objects "
    "tracking_shuffled_objects_seven_objects tracking_shuffled_objects_three_objects web_of_lies "
    "word_sorting"
).split()


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    kind: "multiple_choice" (argmax of choice log-likelihoods), "loglikelihood" (one
    continuation: perplexity and greedy accuracy), "rolling" (document perplexity) or
    "generate" (greedy generation and answer extraction).

    For multiple choice, an item becomes `(context, target_delimiter + continuation)` requests:
    one per choice after `text(doc)`, or, with `multiple_input` (WinoGrande's partial scoring),
    the shared continuation `target(doc)` after each context in `contexts(doc)`.
    """

    name: str
    kind: str
    filename: str
    loader: Callable[[Path, str], list]
    text: Callable[[dict], str] | None = None
    choices: Callable[[dict], list[str]] | None = None
    gold: Callable[[dict], int] | None = None
    contexts: Callable[[dict], list[str]] | None = None  # multiple_input tasks
    target: Callable[[dict], str] | None = None  # continuation / few-shot answer text
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot_file: str | None = None  # a separate few-shot split (MMLU dev); else the same file
    default_fewshot: int = 0
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    until: tuple[str, ...] = ()
    max_gen_toks: int = 256
    answer_type: str = ""  # generation: "gsm8k" or "bbh"
    group: str | None = None
    lm_eval_name: str = ""  # the hub task lm-eval defines with the same format
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def path(self, eval_dir: Path) -> Path:
        return eval_dir / self.filename

    def load(self, eval_dir: Path) -> list:
        return self.loader(self.path(eval_dir), self.name)

    def load_fewshot(self, eval_dir: Path) -> list | None:
        if self.fewshot_file is None:
            return None
        return self.loader(eval_dir / self.fewshot_file, self.name)

    def fewshot_example(self, doc: dict) -> str:
        """A solved example for a few-shot prompt (lm-eval: text + delimiter + gold target)."""
        if self.kind == "multiple_choice" and self.contexts is not None:
            return self.contexts(doc)[self.gold(doc)] + self.target_delimiter + self.target(doc)
        if self.kind == "multiple_choice":
            return self.text(doc) + self.target_delimiter + self.choices(doc)[self.gold(doc)]
        return self.text(doc) + self.target_delimiter + self.target(doc)


def _mc(name: str, filename: str, text: Callable[[dict], str], lm_eval_name: str, **kw) -> TaskSpec:
    return TaskSpec(name=name, kind="multiple_choice", filename=filename, loader=D.read_mc_jsonl,
                    text=text, choices=lambda d: d["choices"], gold=lambda d: d["gold"],
                    lm_eval_name=lm_eval_name, **kw)


def _strip_passage(query: str) -> str:
    return query[len("Passage: "):] if query.startswith("Passage: ") else query


def _mmlu_text(d: dict) -> str:
    c = d["choices"]
    return f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def _build_registry() -> dict[str, TaskSpec]:
    tasks: list[TaskSpec] = [
        _mc("arc_easy", "arc_easy.jsonl", lambda d: d["query"] + "\nAnswer:", "arc_easy",
            notes="local query is 'Question: ...'; lm-eval's prompt adds '\\nAnswer:'"),
        _mc("arc_challenge", "arc_challenge.jsonl", lambda d: d["query"] + "\nAnswer:", "arc_challenge"),
        _mc("piqa", "piqa.jsonl", lambda d: d["query"] + "Answer:", "piqa",
            notes="local query is 'Question: <goal>\\n'"),
        _mc("boolq", "boolq.jsonl", lambda d: _strip_passage(d["query"]) + "\nAnswer:", "boolq",
            metrics=("acc",), notes="the local query's 'Passage: ' prefix is dropped, as lm-eval's prompt"),
        TaskSpec(name="hellaswag", kind="multiple_choice", filename="hellaswag_val_full.txt.bz2",
                 loader=D.read_hellaswag, text=lambda d: d["query"], choices=lambda d: d["choices"],
                 gold=lambda d: d["gold"], lm_eval_name="hellaswag"),
        TaskSpec(name="winogrande", kind="multiple_choice", filename="winogrande.jsonl",
                 loader=D.read_winogrande, contexts=lambda d: d["context_options"],
                 target=lambda d: d["continuation"], gold=lambda d: d["gold"],
                 choices=lambda d: d["context_options"], metrics=("acc",), lm_eval_name="winogrande",
                 notes="partial scoring: the shared continuation is scored after each option"),
        TaskSpec(name="lambada_openai", kind="loglikelihood", filename="lambada_openai.jsonl",
                 loader=lambda p, t: D.read_jsonl(p, t, {"context": str, "continuation": str}),
                 text=lambda d: d["context"], target=lambda d: " " + d["continuation"],
                 target_delimiter="", metrics=("acc", "perplexity"), lm_eval_name="lambada_openai"),
        TaskSpec(name="wikitext", kind="rolling", filename="wikitext2_test.raw",
                 loader=D.read_wikitext_documents, metrics=("word_perplexity", "byte_perplexity",
                                                            "bits_per_byte", "token_perplexity"),
                 lm_eval_name="wikitext",
                 notes="articles split at ' = Title = ' lines; the local file has no blank lines, so "
                       "figures differ slightly from lm-eval's hub wikitext"),
        TaskSpec(name="gsm8k", kind="generate", filename="gsm8k_test.jsonl",
                 loader=lambda p, t: D.read_jsonl(p, t, {"question": str, "answer": str}),
                 text=lambda d: f"Question: {d['question']}\nAnswer:", target=lambda d: d["answer"],
                 default_fewshot=5, metrics=("exact_match_strict", "exact_match_flexible"),
                 until=("Question:", "</s>", "<|im_end|>"), answer_type="gsm8k", lm_eval_name="gsm8k",
                 notes="few-shot examples come from the test file (the current item excluded): no "
                       "train split is available offline"),
    ]
    for subject in MMLU_SUBJECTS:
        tasks.append(TaskSpec(
            name=f"mmlu_{subject}", kind="multiple_choice", filename=f"mmlu/test/{subject}_test.csv",
            loader=D.read_mmlu_csv, text=_mmlu_text, choices=lambda d: ["A", "B", "C", "D"],
            gold=lambda d: d["answer"], fewshot_file=f"mmlu/dev/{subject}_dev.csv", metrics=("acc",),
            description=f"The following are multiple choice questions (with answers) about "
                        f"{subject.replace('_', ' ')}.\n\n",
            group="mmlu", lm_eval_name=f"mmlu_{subject}"))
    for sub in BBH_SUBTASKS:
        tasks.append(TaskSpec(
            name=f"bbh_{sub}", kind="generate", filename=f"bbh/{sub}.json", loader=D.read_bbh,
            text=lambda d: f"Q: {d['input']}\nA:", target=lambda d: d["target"],
            metrics=("exact_match_strict", "exact_match_flexible"), until=("</s>", "Q:", "<|im_end|>"),
            answer_type="bbh", group="bbh", lm_eval_name=f"bbh_zeroshot_{sub}",
            notes="lm-eval's zero-shot BBH format (bbh_zeroshot_*)"))
    return {t.name: t for t in tasks}


TASKS: dict[str, TaskSpec] = _build_registry()
GROUPS: dict[str, list[str]] = {
    "mmlu": [f"mmlu_{s}" for s in MMLU_SUBJECTS],
    "bbh": [f"bbh_{s}" for s in BBH_SUBTASKS],
}
ALIASES = {"lambada": "lambada_openai", "wikitext2": "wikitext", "arc_c": "arc_challenge",
           "arc_e": "arc_easy"}
FILE_PREFIX = "file:"  # `file:PATH`: perplexity of any text file


def text_file_task(path: str) -> TaskSpec:
    """A perplexity task on any text file (`.jsonl`: one document per `text` field)."""
    p = Path(path).expanduser()
    return TaskSpec(name=f"{FILE_PREFIX}{path}", kind="rolling", filename=str(p.resolve()),
                    loader=D.read_text_documents, metrics=("token_perplexity", "word_perplexity",
                                                          "byte_perplexity", "bits_per_byte"))


def available_names() -> list[str]:
    return sorted([*GROUPS, *(n for n in TASKS if TASKS[n].group is None)])


def unknown_task_error(name: str, extra: str = "") -> CBOPruneError:
    pool = sorted([*TASKS, *GROUPS, *ALIASES])
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return CBOPruneError(
        f"unknown task {name!r}: {hint}available: {', '.join(available_names())}, mmlu_<subject>, "
        f"bbh_<subtask>, {FILE_PREFIX}PATH{extra}"
    )


def resolve_tasks(names: str | list[str]) -> list[TaskSpec]:
    """Expand task names (comma-separated string or list; groups `mmlu`, `bbh`; aliases;
    `file:PATH`) into task specs, in order, without duplicates."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    out: list[TaskSpec] = []
    for raw in names:
        name = raw.strip()
        if not name:
            continue
        if name.startswith(FILE_PREFIX):
            specs = [text_file_task(name[len(FILE_PREFIX):])]
        else:
            name = ALIASES.get(name.lower(), name.lower())
            if name in GROUPS:
                specs = [TASKS[n] for n in GROUPS[name]]
            elif name in TASKS:
                specs = [TASKS[name]]
            else:
                raise unknown_task_error(raw.strip())
        out += [s for s in specs if s.name not in {o.name for o in out}]
    if not out:
        raise CBOPruneError(f"no task given: pass --tasks with one or more of {', '.join(available_names())}")
    return out
