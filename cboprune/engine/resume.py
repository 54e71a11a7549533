"""Resuming a long comparison: with healing, every finished step of `compare` / `study` (a method's
selection, a configuration's evaluation, a heal) is kept as one JSON file under
`<output-dir>.heal-cache`, named by a fingerprint of everything it depends on (the weights, the
samples, the settings), so that rerunning an interrupted command redoes only what did not finish.

    StepCache(directory)      load(fields) / save(fields, value): one JSON file per fingerprint
    command_steps(recipe, m)  a command's step cache and the weights' fingerprint its keys carry
    weights_fingerprint(m)    identifies the weights themselves, not the path they came from
    selection_settings(cfg)   the settings that can change a selection (a conservative superset)
    entries_state / entries_from_state   selected entries to JSON and back

Files are written atomically and read back strictly: one that does not parse is computed again,
never trusted (and nothing here is unpickled)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from cboprune.core.outputs import dumps_strict, staged_file
from cboprune.core.ranking import Candidate, Entry, Ranking


log = logging.getLogger(__name__)
T = TypeVar("T")

#: settings that change what is evaluated or healed afterwards, never what a method selects
_NOT_SELECTION = frozenset({"tasks", "limit", "ppl_limit", "eval_batch_size", "data_dir", "max_length", "include_path",
                            "heal_steps", "heal_lr", "heal_micro_batch_size", "heal_global_batch_size", "heal_keep",
                            "heal_states", "repair", "output_dir", "overwrite", "speedup", "domains", "domain_limit",
                            "heal_seeds", "calibrations",
                            # the weights' checksum in every key already tells another revision apart
                            "trust_remote_code", "revision"})


class StepCache:
    """One JSON file per finished step in `directory` (None: nothing is kept)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    @staticmethod
    def key(fields: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def path(self, fields: dict[str, Any]) -> Path | None:
        return None if self.directory is None else self.directory / f"{self.key(fields)}.json"

    def load(self, fields: dict[str, Any], parse: Callable[[dict[str, Any]], T] | None = None) -> T | None:
        """The kept value (through `parse`, which raises on a value of the wrong shape), or None when
        there is none or it is damaged (then it is computed again)."""
        path = self.path(fields)
        if path is None or not path.is_file():
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
            return parse(value) if parse is not None else value
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            log.warning("resume: %s is damaged (%s): computing it again", path, exc)
            return None

    def save(self, fields: dict[str, Any], value: dict[str, Any]) -> None:
        path = self.path(fields)
        if path is None:
            return
        try:
            text = dumps_strict(value, indent=1, default=_plain)  # NaN kept as null: strict JSON
        except (TypeError, ValueError) as exc:  # a value JSON cannot hold exactly: not kept, not corrupted
            log.warning("resume: a step could not be kept (%s): a rerun computes it again", exc)
            return
        with staged_file(path) as stage:  # atomic: a kill never leaves a half-written result
            stage.write_text(text + "\n", encoding="utf-8")


def command_steps(recipe, model) -> tuple[StepCache, str | None]:
    """compare/study: the step cache beside the heals (`recipe.cache_dir / "steps"`; nothing kept
    without healing) and the weights' fingerprint that every key carries (None when nothing is kept)."""
    if recipe is None or recipe.cache_dir is None:
        return StepCache(None), None
    return StepCache(recipe.cache_dir / "steps"), weights_fingerprint(model)


def _plain(value: Any) -> Any:
    """numpy / torch numbers and arrays, and paths, as JSON; anything else is refused (TypeError)
    rather than stored as its str(), which would come back as a different value."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if type(value).__module__ == "torch" and hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON")


def weights_fingerprint(model) -> str:
    """The model's configuration and a checksum of every parameter and buffer: a checkpoint replaced
    at the same path gets other cache entries (the model name alone would reuse stale ones)."""
    import torch

    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_meta:  # offloaded by accelerate: its values are not here to read
                h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|offloaded".encode())
                continue
            flat = t.detach().reshape(-1)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|{float(flat.sum(dtype=torch.float64)):.12e}|"
                     f"{float(flat[::97].abs().sum(dtype=torch.float64)):.12e}".encode())
    return h.hexdigest()[:16]


#: settings that only change an energy model's search after verification: a peer's selection does not
#: read them, so they stay out of its step's key (a kept SLEB selection survives a new re-centring setting)
ENERGY_SEARCH_ONLY = frozenset({"recentre"})


def peer_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in ENERGY_SEARCH_ONLY}


def selection_settings(cfg, command: str) -> dict[str, Any]:
    """The command's settings minus those that only change the evaluation or the healing."""
    return {k: v for k, v in cfg.to_dict(command).items() if k not in _NOT_SELECTION}


def entries_state(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    return [{"method": e.method, "n_remove": e.n_remove, "candidate": e.candidate.to_dict(),
             "ranking": e.ranking.to_dict(), "selection_seconds": e.selection_seconds, "nll": e.nll}
            for e in entries]


def entries_from_state(states: Sequence[dict[str, Any]]) -> list[Entry]:
    """Entries back from `entries_state` (raises on anything of another shape)."""

    if not isinstance(states, list):
        raise TypeError("entries must be a list")
    entries = []
    for s in states:
        entry = Entry(str(s["method"]), int(s["n_remove"]), Candidate.from_dict(s["candidate"]),
                      Ranking.from_dict(s["ranking"]), float(s["selection_seconds"]), nll=_number(s["nll"]))
        if len(entry.candidate.removed) != entry.n_remove or not entry.ranking.candidates:
            raise ValueError(f"{entry.method}: a configuration that does not remove M blocks")
        entries.append(entry)
    return entries


def _number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r} is not a number")
    return float(value)


def evaluation_state(value: dict[str, Any], tasks: Sequence[str] = ()) -> dict[str, Any]:
    """A kept evaluation: {"nll", "eval": {"results": {task: ...}}, ...} with a result for every one
    of `tasks` (raises on another shape)."""
    _number(value["nll"])
    results = value["eval"]["results"] if isinstance(value["eval"], dict) else None
    if not isinstance(results, dict) or not all(isinstance(results.get(t), dict) for t in tasks):
        raise ValueError(f"eval must hold a result for each of {list(tasks)}")
    return value


def heal_state(value: dict[str, Any], tasks: Sequence[str] = ()) -> dict[str, Any]:
    """A kept heal result: an evaluation plus the heal's cross-entropies (raises on another shape).
    A diverged heal (its reason under "diverged") was kept with nulls: its losses come back as NaN."""
    if isinstance(value.get("diverged"), str):
        return {**value, **{k: math.nan for k in ("nll", "heal_ce", "heal_kl")}}
    evaluation_state(value, tasks)
    for key in ("heal_ce", "heal_ce_before", "teacher_ce", "heal_kl", "seconds"):
        _number(value.get(key))
    return value
