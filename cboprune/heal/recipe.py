"""The healing recipe and its defaults, defined once: `HealConfig` (the settings of one heal, and the
options of `cboprune heal`: its flags and YAML keys are generated from the declarations below),
`Config.heal_*` (compare/study/run) and `HealRecipe` all derive from the constants here.

Torch-free (configuration layer): `cboprune.core.config` builds on it and `cboprune --help` must stay light.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cboprune.core.errors import CBOPruneError
from cboprune.core.options import check, option

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
LOSS_ON = ("all", "responses")
HELDOUT_EVAL = ("full", "after-ce")


@dataclass
class HealConfig:
    """One heal: distill `teacher` into the pruned checkpoint `student` on `data`."""
    student: str = option(help="pruned checkpoint directory (written by `cboprune prune` or `run`)", positional=True)
    teacher: str = option(help="the original model (default: source_model from the student's removal.json)",
                          section="data", computed=True)
    data: str = option(help="distillation data: .jsonl/.json/.txt (chat records use the chat template)",
                       section="data")
    output_dir: str = option(help="where the healed checkpoint goes", section="output")
    seq_len: int = option(SEQ_LEN, f"tokens per training sample (default {SEQ_LEN})", "data", kind="int", minimum=1)
    micro_batch_size: int = option(MICRO_BATCH_SIZE, f"samples per forward pass (default {MICRO_BATCH_SIZE})",
                                   "training", kind="int", minimum=1)
    global_batch_size: int = option(GLOBAL_BATCH_SIZE, f"samples per optimizer step; gradient accumulation "
                                                       f"reaches it (default {GLOBAL_BATCH_SIZE})", "training",
                                    kind="int", minimum=1)
    max_steps: int | None = option(None, "optimizer steps (default: --epochs over the data)", "training",
                                   kind="int", minimum=1, aliases=("--steps",))
    epochs: float = option(1.0, "passes over the training set when --max-steps is not given (default 1)",
                           "training", kind="float")
    learning_rate: float = option(LEARNING_RATE, f"peak learning rate (default {LEARNING_RATE:g})", "training",
                                  kind="float", aliases=("--lr",))
    warmup_ratio: float = option(0.05, "fraction of the steps spent warming the learning rate up (default 0.05)",
                                 "training", kind="float", minimum=0)
    min_lr_ratio: float = option(0.1, "the cosine decay ends at this fraction of the peak (default 0.1)",
                                 "training", kind="float", minimum=0)
    weight_decay: float = option(0.0, "AdamW weight decay (default 0)", "training", kind="float", minimum=0)
    optimizer: str = option("adamw", "adamw (default) or adamw8bit (bitsandbytes 8-bit moments, ~4x less state)",
                            "training", choices=OPTIMIZERS, aliases=("--optim",))
    max_grad_norm: float = option(1.0, "gradient clipping norm (default 1)", "training", kind="float", minimum=0)
    temperature: float = option(1.0, "distillation temperature (default 1)", "training", kind="float")
    kd_weight: float = option(1.0, "1: pure KL distillation; below 1 mixes in cross-entropy on the data",
                              "training", kind="float")
    loss_on: str = option("all", "train on all tokens or on the last assistant 'responses' only (default all)",
                          "training", choices=LOSS_ON)
    lora: bool = option(False, "train LoRA adapters (peft) and merge them on save", "training", kind="flag")
    lora_rank: int = option(16, "LoRA rank (default 16)", "training", kind="int", minimum=1)
    lora_alpha: int = option(32, "LoRA alpha (default 32)", "training", kind="int", minimum=1)
    lora_targets: str = option("all-linear", "modules LoRA adapts (peft's target_modules; default all-linear)",
                               "training")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory)",
                                          "training", kind="flag")
    fsdp: bool = option(False, "shard the student across the launched processes (FSDP2; also on under "
                               "`accelerate launch` with an FSDP config)", "training", kind="flag")
    save_every: int = option(50, "checkpoint every N steps (for --resume; default 50; 0: never, for a heal "
                                 "that is rerun rather than resumed)", "output", kind="int", minimum=0)
    resume: bool = option(False, "continue an interrupted run from its last checkpoint", "output", kind="flag")
    heldout_fraction: float = option(0.05, "records held out for the before/after loss (default 0.05)", "data",
                                     kind="float")
    heldout_samples: int | None = option(64, "at most this many held-out records are measured (default 64)",
                                         "data", kind="int", minimum=1)
    max_samples: int | None = option(None, "use at most this many training samples", "data", kind="int", minimum=1)
    seed: int = option(0, "data order and held-out split (default 0)", "training", kind="int")
    teacher_4bit: bool | None = option(None, "NF4 teacher (CUDA + bitsandbytes; default: on when CUDA is present)",
                                       "teacher", kind="bool")
    mixed_precision: str = option("auto", "default auto: bf16 on CUDA, none on CPU", "training",
                                  choices=MIXED_PRECISION)
    save_dtype: str = option("auto", "healed checkpoint dtype (default: the student's)", "output",
                             choices=SAVE_DTYPES)
    loss_chunk_tokens: int | None = option(None, "tokens per chunk of the distillation loss (default: about 16M "
                                                 "logits per chunk; 0: plain formula)", "training", kind="int",
                                           minimum=0)
    teacher_cache: str | None = option(None, "directory of cached teacher top-k outputs: computed once per sample, "
                                             "reused by every student healed on the same data (heal.cache)",
                                       "teacher")
    teacher_top_k: int = option(64, "tokens kept per position in --teacher-cache (default 64)", "teacher",
                                kind="int", minimum=1)
    eval_every: int | None = option(None, "held-out loss every N steps (into healing.json and the curve)", "output",
                                    kind="int", minimum=1)
    # "full": held-out CE of student and teacher and the KL, before and after; "after-ce": only the
    # student's CE after healing (what a heal judge ranks by, at a seventh of the evaluation passes)
    heldout_eval: str = option("full", choices=HELDOUT_EVAL, hidden=True)
    report_to: str = option("none", "also log to TensorBoard or W&B (offline by default)", "output",
                            choices=REPORT_TO)
    logging_dir: str | None = option(None, "tracker log directory (default: <output-dir>.runs)", "output")
    overwrite: bool = option(False, "replace an existing output directory", "output", kind="flag")
    max_minutes: float | None = option(None, "training time budget; stops early and saves when spent", "training",
                                       kind="float")
    stop_after_steps: int | None = option(None, kind="int", hidden=True)  # stop as if killed: for tests

    def validate(self) -> None:
        errors = [p for f in fields(self) if (p := check(f, getattr(self, f.name)))]  # every field is declared
        if isinstance(self.global_batch_size, int) and isinstance(self.micro_batch_size, int) \
                and self.micro_batch_size > 0 and self.global_batch_size % self.micro_batch_size:
            errors.append(f"global_batch_size {self.global_batch_size} must be a multiple of micro_batch_size "
                          f"{self.micro_batch_size}")
        if isinstance(self.learning_rate, (int, float)) and not 0 < self.learning_rate < 1:
            errors.append(f"learning_rate {self.learning_rate} is out of range (0, 1)")
        if isinstance(self.kd_weight, (int, float)) and isinstance(self.temperature, (int, float)) \
                and (not 0 <= self.kd_weight <= 1 or self.temperature <= 0):
            errors.append("kd_weight must lie in [0, 1] and temperature be > 0")
        if self.fsdp and self.lora:
            errors.append("--fsdp with --lora is not supported: LoRA's trainable state is small, so heal it data "
                          "parallel without --fsdp")
        if self.fsdp and self.optimizer == "adamw8bit":
            errors.append("--optim adamw8bit is not supported with --fsdp (bitsandbytes does not quantize sharded "
                          "DTensor state): use adamw")
        if self.fsdp and self.mixed_precision == "fp16":
            errors.append("--fsdp needs --mixed-precision bf16 or no (fp16 would need a sharded gradient scaler)")
        if self.teacher_cache and self.kd_weight == 0:
            errors.append("teacher_cache is useless with kd_weight 0 (no teacher term)")
        if errors:
            raise CBOPruneError("invalid healing configuration: " + "; ".join(errors))

    def fingerprint(self) -> str:
        """Identity of everything that changes the training trajectory (checked on resume)."""
        kept = {k: v for k, v in asdict(self).items() if k not in RUN_ONLY}
        return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: fields that do not change the weights a run produces: they may differ between a run and its resume
RUN_ONLY = {"resume", "overwrite", "max_minutes", "stop_after_steps", "report_to", "logging_dir", "eval_every",
            "heldout_eval", "save_dtype", "save_every", "output_dir"}


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
