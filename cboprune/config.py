"""Run configuration: one validated object fed by a YAML file and CLI flags (flags win).

All problems are collected and reported together before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cboprune.energy import ENERGY_MODELS, RECOMMENDED
from cboprune.errors import CBOPruneError


@dataclass
class RunConfig:
    model: str = "default"
    data: str | None = None  # None: the model answers built-in prompts (model-generated calibration)
    n_samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    remove: list[int] = field(default_factory=lambda: [4, 8])  # values of M
    top: int = 10  # K lowest states per M
    keep: list[int] = field(default_factory=list)  # blocks never removed; negative counts from the end
    only: list[str] = field(default_factory=list)  # remove only blocks of these kinds (e.g. ["moe"]); empty: any
    save_ranks: list[int] = field(default_factory=lambda: [0])  # states saved as checkpoints, per M
    save_remove: list[int] | None = None  # the M values to save checkpoints for (None: all)
    output_dir: str = "outputs/run"
    overwrite: bool = False
    dtype: str = "float32"
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    solver: str = "auto"
    time_limit: float | None = None  # solver seconds per M; None: exact (auto picks a generous budget)
    gen_max_new_tokens: int = 160  # model-generated calibration: answer length
    # Which states (docs/study.md). Defaults: the approach that measured best; the paper's method is
    # energy fisher, verify false, refine_sweeps 0.
    energy: str = RECOMMENDED.energy  # fisher, fisher-linear, exact, measured or relinearized
    verify: bool = RECOMMENDED.verify  # re-rank the K lowest states by measured held-out loss
    refine_sweeps: int = RECOMMENDED.refine_sweeps  # swap search on the real loss from the verified pick
    heldout_samples: int = 16  # extra calibration samples held out for verification and refinement
    pool: int | None = None  # measured energy: pairs only among the P blocks cheapest to remove alone
    relin_step: int = 4  # relinearized energy: removals between expansions
    # Hessian pass (see docs/hessian.md)
    hessian_variant: str = "fisher"  # fisher (the paper's AᵀA/m), centered, or exact (N HVPs, costly)
    autocast: str | None = None  # None (model dtype), bfloat16 or float16: forward under autocast, A in fp32
    gradient_checkpointing: bool = False  # recompute decoder layers in the backward: long sequences fit
    bucket: bool = True  # length-bucketed batches (A's rows stay in sample order)
    shard_dir: str | None = None  # stream A to shards here; a rerun resumes from them
    shard_samples: int = 256  # samples per shard (the unit of resume and of distribution)
    # Healing of the saved checkpoints (see `cboprune heal`)
    heal: bool = False
    heal_data: str | None = None  # distillation data file (default: `data` when it is a file)
    heal_steps: int | None = None  # optimizer steps (default: one epoch)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
        values: dict[str, Any] = {}
        if yaml_path:
            values.update(read_yaml(yaml_path))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise CBOPruneError(f"unknown config keys {unknown}: valid keys are {', '.join(cls.field_names())}")
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        errors = []
        int_lists = {"remove": self.remove, "keep": self.keep, "save_ranks": self.save_ranks,
                     "save_remove": self.save_remove or []}
        for name, value in int_lists.items():
            if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                errors.append(f"{name} must be a list of integers, got {value!r}")
        if isinstance(self.only, str):  # YAML `only: moe` or `only: moe,mamba`
            self.only = [k for k in self.only.replace(" ", "").split(",") if k]
        if not isinstance(self.only, list) or not all(isinstance(k, str) and k for k in self.only):
            errors.append(f"only must be a list of block kinds such as [moe], got {self.only!r}")
        if isinstance(self.remove, list) and not self.remove:
            errors.append("remove must list at least one number of blocks M")
        elif isinstance(self.remove, list) and any(isinstance(m, int) and m <= 0 for m in self.remove):
            errors.append(f"every M in remove must be >= 1, got {self.remove}")
        if self.energy not in ENERGY_MODELS:
            errors.append(f"energy must be one of {', '.join(ENERGY_MODELS)}, got {self.energy!r}")
        if not isinstance(self.verify, bool):
            errors.append(f"verify must be true or false, got {self.verify!r}")
        if not isinstance(self.refine_sweeps, int) or self.refine_sweeps < 0:
            errors.append(f"refine_sweeps must be an integer >= 0, got {self.refine_sweeps!r}")
        if self.pool is not None and (not isinstance(self.pool, int) or self.pool < max(self.remove or [1])):
            errors.append(f"pool must be an integer >= the largest M, got {self.pool!r}")
        for name in ("n_samples", "seq_len", "batch_size", "top", "gen_max_new_tokens", "shard_samples",
                     "heldout_samples", "relin_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.save_ranks, list) and isinstance(self.top, int) and any(
                r < 0 or r >= self.top for r in self.save_ranks if isinstance(r, int)):
            errors.append(f"save_ranks must lie in 0..top-1 = 0..{self.top - 1}, got {self.save_ranks}")
        if self.time_limit is not None and not (isinstance(self.time_limit, (int, float)) and self.time_limit > 0):
            errors.append(f"time_limit must be a positive number of seconds, got {self.time_limit!r}")
        from cboprune.hessian import AUTOCAST_DTYPES, VARIANTS

        if self.hessian_variant not in VARIANTS:
            errors.append(f"hessian_variant must be one of {', '.join(VARIANTS)}, got {self.hessian_variant!r}")
        if self.autocast not in (None, "none", *AUTOCAST_DTYPES):
            errors.append(f"autocast must be bfloat16 or float16 (or unset), got {self.autocast!r}")
        from cboprune.solvers import METHODS

        if self.solver not in METHODS:
            errors.append(f"solver must be one of {', '.join(METHODS)}, got {self.solver!r}")
        if self.heal and not (self.heal_data or self.data):
            errors.append("heal needs distillation data: pass --heal-data FILE (or --data FILE)")
        if self.heal_steps is not None and (not isinstance(self.heal_steps, int) or self.heal_steps < 1):
            errors.append(f"heal_steps must be a positive integer, got {self.heal_steps!r}")
        if errors:
            raise CBOPruneError("invalid configuration: " + "; ".join(errors))

    def check_against_model(self, n_blocks: int, block_kinds: list[str] | None = None) -> list[int]:
        """Validate M values, keep indices and `only` kinds for a model with n_blocks (of kinds
        `block_kinds`); return keep normalized."""
        errors = []
        keep = []
        for i in self.keep:
            j = i + n_blocks if i < 0 else i
            if not 0 <= j < n_blocks:
                errors.append(f"keep index {i} is outside the model's {n_blocks} blocks")
            keep.append(j)
        removable = n_blocks - len(set(keep))
        restriction = f"keep={self.keep}"
        if self.only and block_kinds is not None:
            from cboprune.models.architectures import removable_blocks

            try:
                allowed = removable_blocks(block_kinds, self.only, keep=[j for j in keep if 0 <= j < n_blocks])
            except CBOPruneError as exc:
                errors.append(str(exc))
            else:
                removable = len(allowed)
                restriction = f"only={','.join(self.only)}" + (f", keep={self.keep}" if self.keep else "")
        for m in self.remove:
            if m >= n_blocks:
                errors.append(f"M = {m} removes the whole model: M must be below N = {n_blocks}")
            elif m > removable:
                errors.append(f"M = {m} exceeds the {removable} removable blocks left after {restriction}")
        if errors:
            raise CBOPruneError("; ".join(errors))
        return sorted(set(keep))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CBOPruneError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CBOPruneError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise CBOPruneError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}
