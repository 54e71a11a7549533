"""Which evaluator runs which task, checked before a model loads.

`plan_tasks()` turns the task names a user typed (eval, compare and study take the same ones)
into a `TaskPlan`: tasks the built-in evaluator implements (`cboprune.evaluation.tasks`), the
same tasks run by lm-eval on the local files (`cbo_*` YAMLs), and names passed straight to
lm-eval (its own task configs, hub datasets when online, the user's YAMLs under
`include_path`). Every problem it can see is a one-line `CBOPruneError` before any model work:
unknown names (with "did you mean"), no local data (naming `--data-dir` and
`CBOPRUNE_DATA_DIR`), unreadable `file:` tasks, a task whose dataset is on an unreachable hub.

    plan = plan_tasks("arc_easy,my_task", include_path="my_tasks/")
    res = evaluate(model, tokenizer, plan, limit=100)
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cboprune.core.errors import CBOPruneError
from cboprune.core.hub import hub_reachable
from cboprune.evaluation.data import ENV_VAR, require_file, resolve_eval_dir
from cboprune.evaluation.tasks import FILE_PREFIX, TaskSpec, available_names, resolve_tasks

log = logging.getLogger(__name__)

BACKENDS = ("auto", "builtin", "lm-eval")
_ROLLING = {"rolling", "loglikelihood_rolling"}


@dataclass
class TaskPlan:
    """The checked task list. `kinds` maps every task name (lm-eval's included) to its kind:
    multiple_choice, loglikelihood, rolling / loglikelihood_rolling (perplexity) or generate(_until)."""

    names: list[str]
    builtin: list[TaskSpec] = field(default_factory=list)  # scored by the built-in evaluator
    local_lm_eval: list[TaskSpec] = field(default_factory=list)  # cbo_* YAMLs on the local files
    lm_eval: list[str] = field(default_factory=list)  # passed to lm-eval unchanged
    eval_dir: Path | None = None
    include_path: Path | None = None
    hub_online: bool | None = None  # None: not needed
    kinds: dict[str, str] = field(default_factory=dict)
    manager: Any = field(default=None, repr=False)  # lm-eval TaskManager (built once, slow)
    lm_eval_defaults: bool = True  # whether `manager` indexes lm-eval's own task configs

    @property
    def uses_lm_eval(self) -> bool:
        return bool(self.local_lm_eval or self.lm_eval)

    def perplexity_tasks(self) -> list[str]:
        """Task names (built-in ones expanded, lm-eval ones as given) whose kind is perplexity."""
        return [n for n, k in self.kinds.items() if k in _ROLLING]

    def other_tasks(self) -> list[str]:
        return [n for n, k in self.kinds.items() if k not in _ROLLING]

    def subset(self, names: list[str]) -> TaskPlan:
        """The same plan restricted to `names` (from `perplexity_tasks()` / `other_tasks()`), sharing
        the checked data folder and lm-eval's TaskManager (compare evaluates each part with its own limit)."""
        keep = set(names)
        return replace(self, names=[n for n in self.names if n in keep] or list(names),
                       builtin=[s for s in self.builtin if s.name in keep],
                       local_lm_eval=[s for s in self.local_lm_eval if s.name in keep],
                       lm_eval=[n for n in self.lm_eval if n in keep],
                       kinds={n: k for n, k in self.kinds.items() if n in keep})


@contextlib.contextmanager
def hub_access(online: bool) -> Iterator[None]:
    """Offline, make `datasets` fail at once instead of retrying the hub for ~20 s per dataset
    (local files and cached datasets still load); the settings are restored afterwards."""
    if online:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _split_names(tasks: str | list[str]) -> list[str]:
    raw = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in raw if n and n.strip()]
    if not names:
        raise CBOPruneError(f"no task given: pass --tasks, e.g. --tasks arc_easy,wikitext (available: "
                            f"{', '.join(available_names())}, or any lm-eval task name)")
    return names


def _check_include_path(include_path: str | os.PathLike | None) -> Path | None:
    if include_path is None:
        return None
    path = Path(include_path).expanduser()
    if not path.is_dir():
        raise CBOPruneError(f"--include-path {include_path} is not a directory: pass the folder holding "
                            "your lm-eval task YAMLs")
    if not any(path.rglob("*.yaml")) and not any(path.rglob("*.yml")):
        raise CBOPruneError(f"--include-path {include_path} holds no .yaml task files")
    return path.resolve()


def _task_manager(include_path: Path | None, names: list[str]) -> tuple[Any, bool]:
    """(TaskManager that knows `names`, whether it indexes lm-eval's own configs): the user's folder
    alone when it holds them all (fast), else lm-eval's ~15k task configs too (~20 s to index)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise CBOPruneError("lm-eval is not installed: run `pip install lm-eval==0.4.13` to use lm-eval "
                            "tasks, or use the built-in tasks (--list-tasks)") from None
    if include_path is not None:
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(n in manager.all_tasks for n in names):
            return manager, False
    log.info("indexing lm-eval's tasks%s", f" and {include_path}" if include_path else "")
    return TaskManager(include_path=str(include_path) if include_path else None), True


def _unknown(name: str, manager: Any) -> CBOPruneError:
    pool = sorted({*manager.all_tasks, *available_names()})
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return CBOPruneError(f"unknown task {name!r}: {hint}it is neither a built-in task (--list-tasks) nor an "
                         "lm-eval task (`lm_eval ls tasks`); for your own YAML task pass --include-path DIR")


def _load_error(names: list[str], exc: BaseException, online: bool, no_data: list[str]) -> CBOPruneError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if not online and (isinstance(exc, ConnectionError) or "OfflineModeIsEnabled" in first):
        local = (f"; for {', '.join(no_data)} point --data-dir (or {ENV_VAR}) at the folder holding eval/"
                 if no_data else "")
        return CBOPruneError(f"lm-eval task(s) {', '.join(names)} need their dataset from the Hugging Face hub, "
                             f"which is unreachable (offline: {first}){local}; or write a task YAML whose "
                             "dataset_kwargs.data_files point at local files and pass --include-path DIR")
    return CBOPruneError(f"could not load lm-eval task(s) {', '.join(names)}: {first}")


def _check_lm_eval_tasks(plan: TaskPlan, no_data: list[str]) -> None:
    """Load lm-eval's tasks once (datasets included) so a missing or offline dataset fails now."""
    plan.manager, plan.lm_eval_defaults = _task_manager(plan.include_path, plan.lm_eval)
    for name in plan.lm_eval:
        if name not in plan.manager.all_tasks:
            raise _unknown(name, plan.manager)
    plan.hub_online = hub_reachable()
    for name in plan.lm_eval:
        try:
            with hub_access(plan.hub_online):
                loaded = plan.manager.load([name])
        except Exception as exc:  # noqa: BLE001  (datasets and lm-eval raise many types)
            raise _load_error([name], exc, plan.hub_online, no_data) from exc
        kinds = {task.get_config("output_type") or "unknown" for task in loaded["tasks"].values()}
        # a group is a perplexity task only when all its members are
        plan.kinds[name] = kinds.pop() if len(kinds) == 1 else "mixed"


def plan_tasks(tasks: str | list[str] | TaskPlan, *, backend: str = "auto", include_path: str | os.PathLike | None = None,
               data_dir: str | os.PathLike | None = None, apply_chat_template: bool = False,
               check_lm_eval: bool = True) -> TaskPlan:
    """Check `tasks` and decide who scores each one (see the module docstring).

    backend "auto" (default): the built-in evaluator for the tasks it implements, lm-eval for the
    rest; a built-in task without local data goes to lm-eval's hub task of the same name when the
    hub answers. "builtin": built-in tasks only. "lm-eval": everything through lm-eval (built-in
    tasks on the local files via the shipped `cbo_*` YAMLs). `apply_chat_template` needs lm-eval.
    `check_lm_eval=False` skips indexing and loading lm-eval's tasks (a quick name check only).
    """
    if isinstance(tasks, TaskPlan):
        return tasks
    if backend not in BACKENDS:
        raise CBOPruneError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if apply_chat_template and backend == "builtin":
        raise CBOPruneError("--apply-chat-template needs lm-eval: pass --backend lm-eval (or auto)")
    plan = TaskPlan(names=_split_names(tasks), include_path=_check_include_path(include_path))
    ours: list[TaskSpec] = []
    for name in plan.names:
        try:
            ours += [s for s in resolve_tasks([name]) if s.name not in {o.name for o in ours}]
        except CBOPruneError:
            if backend == "builtin":
                raise
            plan.lm_eval.append(name)
    for spec in ours:
        if spec.name.startswith(FILE_PREFIX):
            spec.load(Path("."))  # cheap: a binary, non-UTF-8 or missing file fails here
    via_lm_eval = backend == "lm-eval" or apply_chat_template
    no_data: list[str] = []
    if any(not s.name.startswith(FILE_PREFIX) for s in ours):
        try:
            plan.eval_dir = resolve_eval_dir(data_dir)
        except CBOPruneError as exc:
            if backend == "builtin" or data_dir is not None or os.environ.get(ENV_VAR) or not check_lm_eval:
                raise
            if not hub_reachable():
                raise CBOPruneError(f"{exc} (lm-eval's hub copies of these tasks need the Hugging Face hub, "
                                    "which is unreachable)") from None
            no_data = [s.name for s in ours if not s.name.startswith(FILE_PREFIX)]
            log.info("no local benchmark data: %s go to lm-eval's hub tasks", ", ".join(no_data))
    for spec in ours:
        if plan.eval_dir is not None and not spec.name.startswith(FILE_PREFIX):
            require_file(spec.path(plan.eval_dir), spec.name)  # a missing file fails before the model loads
        if spec.name in no_data:
            plan.lm_eval.append(spec.lm_eval_name or spec.name)
        elif via_lm_eval:
            if spec.name.startswith(FILE_PREFIX):
                raise CBOPruneError(f"task {spec.name!r} has no lm-eval definition: drop --backend lm-eval "
                                    "and --apply-chat-template for it")
            plan.local_lm_eval.append(spec)
            plan.kinds[spec.name] = spec.kind
        else:
            plan.builtin.append(spec)
            plan.kinds[spec.name] = spec.kind
    if plan.lm_eval and check_lm_eval:
        _check_lm_eval_tasks(plan, no_data)
    return plan
