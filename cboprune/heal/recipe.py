"""The healing recipe and its defaults, defined once: `cboprune heal`, `HealConfig`, `Config.heal_*`
(compare/study/run) and `HealRecipe` all derive from the constants here.

Torch-free (configuration layer): `cboprune.config` builds on it and `cboprune --help` must stay light.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cboprune.errors import CBOPruneError

#: the healing defaults (the after-healing study's recipe: docs/healing.md)
LEARNING_RATE = 5e-5
SEQ_LEN = 256
MICRO_BATCH_SIZE = 4
GLOBAL_BATCH_SIZE = 16
#: the choices of `cboprune heal`'s options (its parser must not import the trainer: start-up)
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
REPORT_TO = ("none", "tensorboard", "wandb")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class HealRecipe:
    steps: list[int]
    data: str
    teacher: str  # model spec of the original model
    learning_rate: float = LEARNING_RATE
    seq_len: int = SEQ_LEN
    micro_batch_size: int = MICRO_BATCH_SIZE
    global_batch_size: int = GLOBAL_BATCH_SIZE
    lora: bool = False
    seed: int = 0
    max_samples: int | None = None
    keep_checkpoints: Path | None = None  # healed checkpoints are kept here when given (disk)
    cache_dir: Path | None = None  # finished heals (results only) for resume
    teacher_cache: Path | None = None  # teacher top-k outputs computed once, shared by every heal (heal.cache)
    teacher_top_k: int = 64
    heldout_eval: str = "full"  # "after-ce": the heal measures only the student's held-out CE after (judge)
    heldout_samples: int | None = None  # held-out records measured (None: the heal's default, 64)

    def __post_init__(self) -> None:
        if not self.steps or any(not isinstance(s, int) or s < 1 for s in self.steps):
            raise CBOPruneError(f"--heal-steps needs positive numbers of optimizer steps, got {self.steps}")
        if not Path(self.data).is_file():
            raise CBOPruneError(f"healing data not found: {self.data}: pass --heal-data FILE (or --data FILE)")
        self.steps = sorted(set(self.steps))

    def describe(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items()
             if k not in ("keep_checkpoints", "cache_dir", "teacher_cache", "teacher_top_k", "heldout_eval",
                          "heldout_samples")}
        d["tokens_per_step"] = self.global_batch_size * self.seq_len
        if self.teacher_cache is not None:  # another teacher signal (the top-k approximation): other results
            d["teacher_outputs"] = f"cached top-{self.teacher_top_k}"
        if self.heldout_eval != "full":  # fewer measurements in a result: not the same cache entry
            d["heldout_eval"] = self.heldout_eval
        if self.heldout_samples is not None:  # other held-out records: another heal CE
            d["heldout_samples"] = self.heldout_samples
        return d
