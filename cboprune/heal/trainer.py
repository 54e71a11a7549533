"""Knowledge-distillation retraining ("healing") of a pruned checkpoint from the original model.

One loop for one CPU, one GPU or many (data parallel through accelerate / torchrun). The data
order is a pure function of (seed, step): epoch e visits the training set in the permutation
drawn from seed + e, and optimizer step s consumes micro-batches s·A … s·A + A − 1 of the global
stream (A = accumulation steps × processes, rank r taking every world-th micro-batch). A
checkpoint (trainable weights, optimizer, scheduler, RNG, step) is written every `save_every`
steps, so `resume` continues exactly where the last checkpoint left off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cboprune import __version__
from cboprune.errors import CBOPruneError
from cboprune.heal.data import TokenizedSet, load_distillation_data
from cboprune.heal.loss import DistillationLoss

log = logging.getLogger(__name__)

HEALING_FILE = "healing.json"
STATE_SUFFIX = ".heal-state"


@dataclass
class HealConfig:
    student: str
    teacher: str
    data: str
    output_dir: str
    seq_len: int = 256
    micro_batch_size: int = 4
    global_batch_size: int = 16
    max_steps: int | None = None  # None: `epochs` passes over the training set
    epochs: float = 1.0
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    kd_weight: float = 1.0  # 1: pure distillation; below 1 mixes in cross-entropy on the data
    loss_on: str = "all"  # "all" tokens or the last assistant "responses" only
    lora: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_targets: str = "all-linear"
    gradient_checkpointing: bool = False
    save_every: int = 50
    resume: bool = False
    heldout_fraction: float = 0.05
    heldout_samples: int | None = 64
    max_samples: int | None = None
    seed: int = 0
    teacher_4bit: bool | None = None  # None: NF4 when a CUDA GPU and bitsandbytes are present
    overwrite: bool = False
    max_minutes: float | None = None  # wall-clock budget for training; stops early and saves when spent
    stop_after_steps: int | None = None  # stop (as if killed) after this many steps; for tests

    def validate(self) -> None:
        errors = []
        if self.global_batch_size % self.micro_batch_size:
            errors.append(f"global_batch_size {self.global_batch_size} must be a multiple of micro_batch_size "
                          f"{self.micro_batch_size}")
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "save_every"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            errors.append("max_steps must be >= 1")
        if not 0 < self.learning_rate < 1:
            errors.append(f"learning_rate {self.learning_rate} is out of range (0, 1)")
        if not 0 <= self.kd_weight <= 1 or self.temperature <= 0:
            errors.append("kd_weight must lie in [0, 1] and temperature be > 0")
        if errors:
            raise CBOPruneError("invalid healing configuration: " + "; ".join(errors))


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to min_ratio at total_steps."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def heldout_loss(model, data: TokenizedSet, *, batch_size: int = 8, teacher=None) -> float:
    """Mean next-token cross-entropy over the loss-mask tokens of `data` (lower is better); with a
    teacher, the mean forward KL(teacher || model) over the same tokens instead."""
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    was_training = model.training
    model.eval()
    kl = DistillationLoss(temperature=1.0, kd_weight=1.0)
    for lo in range(0, len(data), batch_size):
        mask = data.attention_mask[lo:lo + batch_size]
        width = int(mask.sum(1).max())
        ids = data.input_ids[lo:lo + batch_size, :width].to(device)
        mask = mask[:, :width].to(device)
        loss_mask = data.loss_mask[lo:lo + batch_size, :width].to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        n = float(loss_mask[:, 1:].sum())
        if teacher is not None:
            total += float(kl(logits, teacher(input_ids=ids, attention_mask=mask).logits, ids, loss_mask)) * n
        else:
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                                   reduction="none")
            total += float((ce * loss_mask[:, 1:]).sum())
        count += n
    model.train(was_training)
    return total / max(count, 1.0)


def _load_teacher(cfg: HealConfig, device: torch.device):
    from cboprune.models import load_model

    use_4bit = cfg.teacher_4bit if cfg.teacher_4bit is not None else torch.cuda.is_available()
    if use_4bit:
        if not torch.cuda.is_available():
            raise CBOPruneError("a 4-bit NF4 teacher needs a CUDA GPU: drop --teacher-4bit")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        except ImportError:
            if cfg.teacher_4bit:
                raise CBOPruneError("--teacher-4bit needs bitsandbytes: pip install bitsandbytes") from None
            log.warning("bitsandbytes is not installed: teacher loaded in bf16 instead of 4-bit NF4")
        else:
            from cboprune.models.loading import resolve_model_source

            source, _ = resolve_model_source(cfg.teacher)
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant,
                                                         device_map={"": device.index or 0})
            return model.eval(), "nf4"
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    return load_model(cfg.teacher, dtype=dtype, device=str(device)).model, dtype


def _micro_batch_indices(n: int, micro: int, seed: int, index: int) -> torch.Tensor:
    """Sample indices of global micro-batch `index` in the deterministic stream (epochs chained)."""
    per_epoch = math.ceil(n / micro)
    epoch, pos = divmod(index, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[pos * micro:(pos + 1) * micro]


def _save_state(state_dir: Path, model, optimizer, scheduler, step: int, trainable_names: list[str]) -> None:
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = dict(model.named_parameters())
    torch.save({n: params[n].detach().cpu() for n in trainable_names}, tmp / "trainable.pt")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": torch.get_rng_state(), "step": step}, tmp / "training.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(state_dir, ignore_errors=True)
    os.replace(tmp, state_dir)


def _load_state(state_dir: Path, model, optimizer, scheduler) -> int:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in torch.load(state_dir / "trainable.pt", weights_only=True).items():
            params[name].copy_(value)
    training = torch.load(state_dir / "training.pt", weights_only=False)
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    torch.set_rng_state(training["rng"])
    return int(training["step"])


def heal(cfg: HealConfig, *, progress: bool = True) -> dict[str, Any]:
    """Distill `cfg.teacher` into the pruned `cfg.student`; save the healed checkpoint to
    `cfg.output_dir` with `removal.json` (copied) and `healing.json` (losses before/after)."""
    from accelerate import Accelerator

    from cboprune.models import load_model
    from cboprune.models.surgery import REMOVAL_FILE, save_pruned

    cfg.validate()
    out_dir = Path(cfg.output_dir)
    state_root = out_dir.with_name(out_dir.name + STATE_SUFFIX)
    if out_dir.exists() and any(out_dir.iterdir()) and not cfg.overwrite:
        raise CBOPruneError(f"output directory {out_dir} is not empty: choose another or pass --overwrite")
    if state_root.exists() and not cfg.resume:
        raise CBOPruneError(f"{state_root} holds an unfinished healing run: pass --resume to continue it, "
                            "or delete it to start over")
    if cfg.resume and not (state_root / "latest").is_dir():
        log.warning("--resume given but no checkpoint in %s: starting from step 0", state_root)

    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    student_loaded = load_model(cfg.student, dtype="float32", device=str(device))
    student, tokenizer = student_loaded.model, student_loaded.tokenizer
    teacher, teacher_precision = _load_teacher(cfg, device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if student.get_output_embeddings().weight.shape[0] != teacher.get_output_embeddings().weight.shape[0]:
        raise CBOPruneError("student and teacher have different vocabularies: the teacher must be the model "
                            "the student was pruned from")
    train, held = load_distillation_data(cfg.data, tokenizer, seq_len=cfg.seq_len,
                                         heldout_fraction=cfg.heldout_fraction, max_samples=cfg.max_samples,
                                         heldout_samples=cfg.heldout_samples, loss_on=cfg.loss_on, seed=cfg.seed)
    before = _heldout_metrics(student, teacher, held, with_teacher=True)

    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                     target_modules=cfg.lora_targets, task_type="CAUSAL_LM"))
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:
            student.enable_input_require_grads()
    trainable_names = [n for n, p in student.named_parameters() if p.requires_grad]
    world = accelerator.num_processes
    if cfg.global_batch_size % (cfg.micro_batch_size * world):
        raise CBOPruneError(f"global_batch_size {cfg.global_batch_size} must be a multiple of micro_batch_size x "
                            f"processes = {cfg.micro_batch_size * world}")
    accumulation = cfg.global_batch_size // (cfg.micro_batch_size * world)
    micro_per_step = accumulation * world
    total_steps = cfg.max_steps or max(1, math.floor(cfg.epochs * math.ceil(len(train) / cfg.micro_batch_size)
                                                     / micro_per_step))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, max(1, round(cfg.warmup_ratio * total_steps)), cfg.min_lr_ratio))
    student, optimizer = accelerator.prepare(student, optimizer)
    loss_fn = DistillationLoss(cfg.temperature, cfg.kd_weight)

    step = 0
    if cfg.resume and (state_root / "latest").is_dir():
        step = _load_state(state_root / "latest", accelerator.unwrap_model(student), optimizer, scheduler)
        log.info("resumed from step %d", step)
    student.train()
    history = []
    start = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc="healing (distillation)", unit="step",
               disable=not progress or not accelerator.is_main_process)
    stopped_early = False
    while step < total_steps:
        if cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes:
            log.warning("time budget of %.1f min spent after %d of %d steps: saving", cfg.max_minutes, step,
                        total_steps)
            stopped_early = True
            break
        if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
            bar.close()
            return {"stopped_at_step": step}
        step_loss = 0.0
        for j in range(accumulation):
            index = step * micro_per_step + j * world + accelerator.process_index
            rows = _micro_batch_indices(len(train), cfg.micro_batch_size, cfg.seed, index)
            mask = train.attention_mask[rows]
            width = int(mask.sum(1).max())
            ids, mask = train.input_ids[rows, :width].to(device), mask[:, :width].to(device)
            loss_mask = train.loss_mask[rows, :width].to(device)
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits if cfg.kd_weight > 0 else None
            sync = j == accumulation - 1
            with accelerator.autocast(), (nullcontext() if sync else accelerator.no_sync(student)):
                logits = student(input_ids=ids, attention_mask=mask).logits
                loss = loss_fn(logits, teacher_logits, ids, loss_mask) / accumulation
                accelerator.backward(loss)
            step_loss += float(loss)
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        history.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if accelerator.is_main_process and (step % cfg.save_every == 0 or step == total_steps):
            _save_state(state_root / "latest", accelerator.unwrap_model(student), optimizer, scheduler, step,
                        trainable_names)
    bar.close()
    seconds = time.perf_counter() - start

    model = accelerator.unwrap_model(student)
    if cfg.lora:
        model = model.merge_and_unload()
    after = _heldout_metrics(model, teacher, held)
    report = {
        "cboprune_version": __version__,
        "student": cfg.student,
        "teacher": cfg.teacher,
        "teacher_precision": teacher_precision,
        "config": asdict(cfg),
        "steps": step,
        "planned_steps": total_steps,
        "stopped_by_time_budget": stopped_early,
        "train_samples": len(train),
        "heldout_samples": len(held),
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "gap_closed": _gap_closed(before, after),
        "train_loss_first_last": [history[0], history[-1]] if history else None,
        "seconds": round(seconds, 1),
    }
    if accelerator.is_main_process:
        student_removal = Path(student_loaded.checkpoint_dir or "") / REMOVAL_FILE
        provenance = json.loads(student_removal.read_text()) if student_removal.is_file() else {}
        model.config.use_cache = True
        save_pruned(model, tokenizer, out_dir, provenance, overwrite=cfg.overwrite)
        (out_dir / HEALING_FILE).write_text(json.dumps(report, indent=2) + "\n")
        shutil.rmtree(state_root, ignore_errors=True)
    return report


def _heldout_metrics(model, teacher, held: TokenizedSet, with_teacher: bool = False) -> dict[str, float]:
    """Held-out cross-entropy of the model (and the teacher), and KL(teacher || model)."""
    if not len(held):
        return {}
    out = {"student": heldout_loss(model, held), "kl_to_teacher": heldout_loss(model, held, teacher=teacher)}
    if with_teacher:
        out["teacher"] = heldout_loss(teacher, held)
    return out


def _gap_closed(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Fraction of the student-teacher held-out loss gap that healing closed."""
    if not before or not after or before["student"] <= before["teacher"]:
        return None
    return (before["student"] - after["student"]) / (before["student"] - before["teacher"])
