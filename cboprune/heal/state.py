"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

A state directory holds exactly three files:
- `trainable.safetensors`: the trainable parameters by name;
- `optimizer.safetensors`: the optimizer's per-parameter tensors (`state.<param id>.<key>`) and the
  CPU RNG state (`rng.cpu`);
- `state.json`: the step, the optimizer's param groups and non-tensor per-parameter values, the
  scheduler's state dict and a fingerprint of the configuration that wrote it.

Nothing is ever unpickled, so a file swapped into the directory can at worst be refused. Any file
that cannot be read back exactly is a one-line `CBOPruneError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cboprune.core.errors import CBOPruneError
from cboprune.core.outputs import staged_dir

STATE_FILES = ("trainable.safetensors", "optimizer.safetensors", "state.json")
FORMAT = 1


def save_state(state_dir: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
               scheduler_state: dict[str, Any], step: int, fingerprint: str, extra: dict[str, Any] | None = None) -> None:
    """Write the state into a staging directory next to `state_dir`, then rename it over it
    (`outputs.staged_dir`: a kill between the two renames leaves the previous state, put back next run).

    weights: the trainable parameters by name (whole tensors); optimizer_state: a torch optimizer
    state dict whose parameters are numbered (see heal.sharding.capture)."""
    with staged_dir(state_dir, overwrite=True) as tmp:
        _write_state(tmp, weights, optimizer_state, scheduler_state, step, fingerprint, extra)


def _write_state(tmp: Path, weights: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                 scheduler_state: dict[str, Any], step: int, fingerprint: str, extra: dict[str, Any] | None) -> None:
    save_file({n: t.detach().cpu().contiguous() for n, t in weights.items()}, tmp / STATE_FILES[0])
    tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
    scalars: dict[str, dict[str, Any]] = {}
    seen = {t.untyped_storage().data_ptr() for t in tensors.values()}  # safetensors refuses shared storage
    for pid, values in optimizer_state["state"].items():
        for key, value in _flat(values):
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().contiguous()
                if value.untyped_storage().data_ptr() in seen:  # e.g. bitsandbytes' shared quantization maps
                    value = value.clone()
                seen.add(value.untyped_storage().data_ptr())
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    save_file(tensors, tmp / STATE_FILES[1])
    meta = {"format": FORMAT, "step": step, "fingerprint": fingerprint,
            "param_groups": optimizer_state["param_groups"], "state_scalars": scalars,
            "state_ids": [str(p) for p in optimizer_state["state"]], "scheduler": scheduler_state, **(extra or {})}
    (tmp / STATE_FILES[2]).write_text(json.dumps(meta, indent=1))


def read_state_meta(state_dir: Path) -> dict[str, Any]:
    """state.json of a state directory, checked for shape; cheap, so called before any model loads."""
    if not state_dir.is_dir():
        raise CBOPruneError(f"heal state {state_dir} is not a directory: delete it to start over")
    legacy = sorted(p.name for p in state_dir.glob("*.pt"))
    if legacy:
        raise CBOPruneError(f"heal state {state_dir} holds pickle files ({', '.join(legacy)}), which are never "
                            "loaded (they can run code): delete the directory to start over")
    missing = [f for f in STATE_FILES if not (state_dir / f).is_file()]
    if missing:
        raise CBOPruneError(f"heal state {state_dir} is incomplete (missing {', '.join(missing)}): delete it to "
                            "start over")
    try:
        meta = json.loads((state_dir / STATE_FILES[2]).read_text(encoding="utf-8"))
        ok = (isinstance(meta, dict) and meta.get("format") == FORMAT and isinstance(meta.get("step"), int)
              and isinstance(meta.get("param_groups"), list) and isinstance(meta.get("scheduler"), dict))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        raise CBOPruneError(f"heal state {state_dir / STATE_FILES[2]} is malformed: delete {state_dir} to start over")
    return meta


def _load_tensors(path: Path, only: str | None = None) -> dict[str, torch.Tensor]:
    try:
        if only is None:
            return load_file(path)
        with safe_open(path, framework="pt") as f:
            return {only: f.get_tensor(only)} if only in f.keys() else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CBOPruneError(f"heal state file {path} is not a readable safetensors file "
                            f"({str(e).splitlines()[0][:120]}): delete {path.parent} to start over") from None


def _flat(values: dict[str, Any], prefix: str = ""):
    """(dotted key, leaf) of a per-parameter optimizer state; bitsandbytes' 8-bit optimizers nest
    their quantization state one dict deeper. torch's own keys hold no dots."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _put(values: dict[str, Any], dotted: str, leaf: Any) -> None:
    *outer, last = dotted.split(".")
    for key in outer:
        values = values.setdefault(key, {})
    values[last] = leaf


@dataclass
class SavedState:
    """A state directory read back: `weights` and `optimizer` are None when read without tensors
    (the ranks of a sharded run that receive them from rank 0)."""

    step: int
    meta: dict[str, Any]
    rng: torch.Tensor
    weights: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None


def read_state(state_dir: Path, fingerprint: str, *, tensors: bool = True) -> SavedState:
    """Read a state directory written by `save_state` for a run with `fingerprint`."""
    meta = read_state_meta(state_dir)
    if meta.get("fingerprint") != fingerprint:
        raise CBOPruneError(f"heal state {state_dir} was written by a run with a different configuration "
                            "(student, teacher, data or training options): rerun with the same options, or "
                            "delete it to start over")
    if not tensors:
        rng = _load_tensors(state_dir / STATE_FILES[1], only="rng.cpu")
        if "rng.cpu" not in rng:
            raise CBOPruneError(f"heal state {state_dir} lacks its RNG state: delete it to start over")
        return SavedState(int(meta["step"]), meta, rng["rng.cpu"], None, None)
    weights = _load_tensors(state_dir / STATE_FILES[0])
    optimizer_tensors = _load_tensors(state_dir / STATE_FILES[1])
    if "rng.cpu" not in optimizer_tensors:
        raise CBOPruneError(f"heal state {state_dir} lacks its RNG state: delete it to start over")
    state: dict[int, dict[str, Any]] = {}
    try:
        for key, value in optimizer_tensors.items():
            if key.startswith("state."):
                _, pid, name = key.split(".", 2)
                _put(state.setdefault(int(pid), {}), name, value)
        for pid, values in meta.get("state_scalars", {}).items():
            for name, value in values.items():
                _put(state.setdefault(int(pid), {}), name, value)
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    except (ValueError, TypeError, AttributeError):
        raise CBOPruneError(f"heal state {state_dir} has a malformed optimizer state: delete it to start over") from None
    return SavedState(int(meta["step"]), meta, optimizer_tensors["rng.cpu"], weights,
                      {"state": state, "param_groups": groups})
