"""Knowledge-distillation retraining ("healing") of a pruned checkpoint from the original model.

One loop for one CPU, one GPU or many (data parallel through accelerate / torchrun). The data
order is a pure function of (seed, step): epoch e visits the training set in the permutation
drawn from seed + e, and optimizer step s consumes micro-batches s·A … s·A + A − 1 of the global
stream (A = accumulation steps × processes, rank r taking every world-th micro-batch). A
checkpoint (trainable weights, optimizer, scheduler, RNG, step, loss curve; safetensors + JSON,
never pickle, see heal.state) is written every `save_every` steps (never with 0), so `resume`
continues exactly where the last checkpoint left off. The healed checkpoint is staged beside the output directory
and renamed onto it, so an interruption never leaves a half-written output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cboprune import (
    models,  # models.load_model: tests replace it to prove nothing loads early
)
from cboprune.data.calibration import check_seq_len
from cboprune.core.errors import CBOPruneError, DivergedError
from cboprune.core.finite import require_finite
from cboprune.heal import recipe
from cboprune.heal.recipe import HealConfig
from cboprune.heal.cache import TeacherCache
from cboprune.heal.data import (
    TokenizedSet,
    load_distillation_data,
    read_distillation_items,
)
from cboprune.heal.loss import DistillationLoss, SparseTeacher, head_loss
from cboprune.heal.sharding import (
    accelerate_without_fsdp,
    capture,
    fsdp_requested,
    gathered_weights,
    restore,
    shard_student,
)
from cboprune.heal.state import read_state, read_state_meta, save_state
from cboprune.models.loading import load_config, resolve_model_source
from cboprune.models.surgery import REMOVAL_FILE, write_checkpoint
from cboprune.core.outputs import (
    check_output_dir,
    clean_stale_staging,
    dumps_strict,
    is_main_process,
    read_json_object,
    staged_dir,
)
from cboprune.core.version import __version__

log = logging.getLogger(__name__)

HEALING_FILE = "healing.json"
CURVE_FILE = "healing_curve.png"
STATE_SUFFIX = ".heal-state"
AUTO_CHUNK_LOGITS = 1 << 24  # logits per loss chunk when loss_chunk_tokens is auto (64 MiB in fp32)


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float):
    """Linear warm-up to 1, then cosine decay to min_ratio at total_steps."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def heldout_loss(model, data: TokenizedSet, *, batch_size: int = 8, teacher=None, cache=None) -> float:
    """Mean next-token cross-entropy over the loss-mask tokens of `data` (lower is better); with a
    teacher, the mean forward KL(teacher || model) over the same tokens instead; with a
    TeacherCache (held-out split) the top-k approximation of that KL at the cache's temperature."""
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    was_training = model.training
    model.eval()
    kl = DistillationLoss(temperature=1.0 if cache is None else cache.temperature, kd_weight=1.0)
    for lo, ids, mask, loss_mask in _batches(data, batch_size, device):
        logits = model(input_ids=ids, attention_mask=mask).logits
        n = float(loss_mask[:, 1:].sum())
        if cache is not None:
            sparse = _to_device(cache.lookup("heldout", range(lo, lo + len(ids)), ids.shape[1])[0], device)
            total += float(kl(logits, sparse, ids, loss_mask)) / kl.temperature ** 2 * n
        elif teacher is not None:
            total += float(kl(logits, teacher(input_ids=ids, attention_mask=mask).logits, ids, loss_mask)) * n
        else:
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                                   reduction="none")
            total += float((ce * loss_mask[:, 1:]).sum())
        count += n
    model.train(was_training)
    return total / max(count, 1.0)


def _batches(data: TokenizedSet, batch_size: int, device):
    """(first row, input_ids, attention_mask, loss_mask) trimmed to the batch's longest sample."""
    for lo in range(0, len(data), batch_size):
        mask = data.attention_mask[lo:lo + batch_size]
        width = int(mask.sum(1).max())
        yield (lo, data.input_ids[lo:lo + batch_size, :width].to(device), mask[:, :width].to(device),
               data.loss_mask[lo:lo + batch_size, :width].to(device))


def _to_device(sparse: SparseTeacher, device) -> SparseTeacher:
    return SparseTeacher(sparse.indices.to(device), sparse.logprobs.to(device), sparse.tail_logprob.to(device))


def _teacher_heldout_ce(cache, held: TokenizedSet) -> float:
    """The teacher's held-out cross-entropy from the cached next-token log-probabilities."""
    _, target = cache.lookup("heldout", range(len(held)), held.input_ids.shape[1])
    weights = held.loss_mask[:, 1:].float()
    return float(-(target[:, :-1] * weights).sum() / weights.sum().clamp_min(1.0))


def _load_teacher(cfg: HealConfig, device: torch.device):
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
            source, _ = resolve_model_source(cfg.teacher)
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.bfloat16)
            model = AutoModelForCausalLM.from_pretrained(source, quantization_config=quant,
                                                         device_map={"": device.index or 0})
            return model.eval(), "nf4"
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    model = models.load_model(cfg.teacher, dtype=dtype, device=str(device), tokenizer=False).model
    for p in model.parameters():
        p.requires_grad_(False)
    return model, dtype


def _micro_batch_indices(n: int, micro: int, seed: int, index: int) -> torch.Tensor:
    """Sample indices of global micro-batch `index` in the deterministic stream (epochs chained)."""
    per_epoch = math.ceil(n / micro)
    epoch, pos = divmod(index, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[pos * micro:(pos + 1) * micro]


@dataclass
class _Paths:
    out: Path  # the healed checkpoint
    state: Path  # resumable training state (<out>.heal-state), removed when the run completes


def check_output_paths(cfg: HealConfig) -> _Paths:
    """Refuse an output that cannot be written or would destroy inputs, before any work.

    Every rank refuses the same inputs (cheap, read-only checks), but only the main process probes
    the place and cleans what an interrupted save left (`outputs.check_output_dir`, probe names
    unique per process): two ranks staging or removing one fixed entry raced."""
    out = Path(cfg.output_dir).expanduser()
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise CBOPruneError(f"output directory {cfg.output_dir} is the current directory or one above it: "
                            "name a new directory for the healed checkpoint")
    for what in ("student", "teacher", "data", "teacher_cache"):
        given = getattr(cfg, what)
        if given and Path(given).expanduser().exists():
            inside = Path(given).expanduser().resolve()
            if inside == resolved or resolved in inside.parents:
                raise CBOPruneError(f"output directory {cfg.output_dir} holds the {what.replace('_', ' ')} "
                                    f"({given}): choose another --output-dir")
    if out.exists() and not out.is_dir():
        raise CBOPruneError(f"output path {cfg.output_dir} is a file: pass a directory with --output-dir")
    if out.is_dir() and any(out.iterdir()) and not cfg.overwrite:
        raise CBOPruneError(f"output directory {cfg.output_dir} is not empty: choose another or pass --overwrite")
    paths = _Paths(resolved, resolved.with_name(resolved.name + STATE_SUFFIX))
    if paths.state.exists() and not cfg.resume:
        raise CBOPruneError(f"{paths.state} holds an unfinished healing run: pass --resume to continue it, "
                            "or delete it to start over")
    if is_main_process():
        check_output_dir(resolved, overwrite=cfg.overwrite)
    return paths


def _resume_state(cfg: HealConfig, paths: _Paths) -> Path | None:
    """The state to resume from (checked cheaply, before any model loads) or None."""
    if not cfg.resume:
        return None
    if paths.state.exists() and not paths.state.is_dir():
        raise CBOPruneError(f"heal state {paths.state} is not a directory: delete it to start over")
    latest = paths.state / "latest"
    if is_main_process():  # a kill between the two renames of a state save: the previous one is put back
        clean_stale_staging(latest)
    if not latest.exists():
        if paths.state.is_dir() and any(not p.name.startswith(".latest.") for p in paths.state.iterdir()):
            raise CBOPruneError(f"heal state {paths.state} has no checkpoint 'latest' but other files: "
                                "delete it to start over")
        log.warning("--resume given but no checkpoint in %s: starting from step 0", paths.state)
        return None
    meta = read_state_meta(latest)
    if meta.get("fingerprint") != cfg.fingerprint():
        raise CBOPruneError(f"heal state {paths.state} was written with other options (student, teacher, data or "
                            "training options): rerun with the same options, or delete it to start over")
    return latest


def _save_dtype(cfg: HealConfig, checkpoint_dir: str | None) -> torch.dtype:
    """The healed checkpoint's dtype: as asked, or the student checkpoint's own (float32 if unknown)."""
    name = cfg.save_dtype
    if name == "auto":
        config = Path(checkpoint_dir or "") / "config.json"
        stored = json.loads(config.read_text()) if config.is_file() else {}
        name = stored.get("dtype") or stored.get("torch_dtype") or "float32"
    return getattr(torch, name) if name in recipe.SAVE_DTYPES else torch.float32


def _write_output(paths: _Paths, model, tokenizer, provenance: dict, report: dict, overwrite: bool) -> None:
    """Checkpoint + healing.json + curve, staged and committed by `outputs.staged_dir`: an
    interruption leaves either the complete output or none (a killed run's staging is cleaned next run).
    The main process only."""
    with staged_dir(paths.out, overwrite=overwrite) as stage:
        write_checkpoint(model, tokenizer, stage, provenance)
        (stage / HEALING_FILE).write_text(dumps_strict(report, indent=2) + "\n", encoding="utf-8")
        plot_curve(report, stage / CURVE_FILE)


def plot_curve(report: dict, path: Path) -> Path | None:
    """healing_curve.png: train loss per step and held-out loss at each evaluation."""
    curve = report.get("curve") or {}
    if not curve.get("train"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["step"] for p in curve["train"]], [p["loss"] for p in curve["train"]], label="train (distillation)")
    if curve.get("heldout"):
        ax.plot([p["step"] for p in curve["heldout"]], [p["loss"] for p in curve["heldout"]], "o-",
                label="held-out cross-entropy")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _check_tracker(cfg: HealConfig) -> Path | None:
    """The tracker's log directory; a one-line error when the tracker's library is missing."""
    if cfg.report_to == "none":
        return None
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = is_tensorboard_available() if cfg.report_to == "tensorboard" else is_wandb_available()
    if not available:
        package = "tensorboard" if cfg.report_to == "tensorboard" else "wandb"
        raise CBOPruneError(f"--report-to {cfg.report_to} needs the {package} package: pip install {package} "
                            "(or --report-to none)")
    if cfg.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # offline unless the user asked for a server
    out = Path(cfg.output_dir).expanduser().resolve()
    return Path(cfg.logging_dir) if cfg.logging_dir else out.with_name(out.name + ".runs")


def _needed_rows(n: int, cfg: HealConfig, micro_batches: int) -> list[int]:
    """Training rows that the first `micro_batches` micro-batches of the stream visit."""
    per_epoch = math.ceil(n / cfg.micro_batch_size)
    if micro_batches >= per_epoch:
        return list(range(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    return perm[:micro_batches * cfg.micro_batch_size].tolist()


def _setup_teacher(cfg: HealConfig, accelerator, train: TokenizedSet, held: TokenizedSet, micro_batches: int,
                   teacher_model=None):
    """(teacher model or None, TeacherCache or None, teacher precision). With a cache, the teacher is
    loaded only while the cache lacks rows this run needs, and freed before training."""
    device = accelerator.device
    if not cfg.teacher_cache:
        if teacher_model is not None:
            return teacher_model, None, str(next(teacher_model.parameters()).dtype).removeprefix("torch.")
        model, precision = _load_teacher(cfg, device)
        return model, None, precision

    def open_cache():
        return TeacherCache.for_run(cfg.teacher_cache, cfg.teacher, train, held, top_k=cfg.teacher_top_k,
                                    temperature=cfg.temperature)

    cache = open_cache() if accelerator.is_main_process else None
    rows = _needed_rows(len(train), cfg, micro_batches)
    if cache is not None and (cache.missing("train", rows) or cache.missing("heldout", range(len(held)))):
        model = teacher_model if teacher_model is not None else _load_teacher(cfg, device)[0]
        log.info("computing teacher outputs for the cache %s", cfg.teacher_cache)
        cache.fill(model, train, "train", rows, batch_size=cfg.micro_batch_size)
        cache.fill(model, held, "heldout", range(len(held)), batch_size=cfg.micro_batch_size)
        del model
    accelerator.wait_for_everyone()
    if cache is None:
        cache = open_cache()
    return None, cache, f"cached top-{cfg.teacher_top_k}"


@dataclass
class _Run:
    """Everything one training loop needs (built by `heal`)."""

    cfg: HealConfig
    accelerator: Any
    student: Any
    optimizer: Any
    scheduler: Any
    loss_fn: DistillationLoss
    train: TokenizedSet
    held: TokenizedSet
    teacher: Any
    cache: Any
    paths: _Paths
    trainable_names: list[str]
    accumulation: int
    total_steps: int
    curve: dict[str, list[dict[str, float]]]
    head_in_loss: bool = False  # the LM head runs inside the chunked loss (no full logits held)
    sharded: bool = False  # the student is sharded with FSDP2 (heal.sharding)


def _micro_batch_loss(run: _Run, step: int, j: int) -> torch.Tensor:
    """Forward + backward of micro-batch j of optimizer step `step`; returns the detached loss."""
    acc, cfg, world = run.accelerator, run.cfg, run.accelerator.num_processes
    index = (step * run.accumulation + j) * world + acc.process_index
    rows = _micro_batch_indices(len(run.train), cfg.micro_batch_size, cfg.seed, index)
    mask = run.train.attention_mask[rows]
    width = int(mask.sum(1).max())
    ids, mask = run.train.input_ids[rows, :width].to(acc.device), mask[:, :width].to(acc.device)
    loss_mask = run.train.loss_mask[rows, :width].to(acc.device)
    target = None
    if run.cache is not None:
        target = _to_device(run.cache.lookup("train", rows.tolist(), width)[0], acc.device)
    elif cfg.kd_weight > 0:
        with torch.no_grad():
            target = run.teacher(input_ids=ids, attention_mask=mask).logits
    sync = j == run.accumulation - 1
    if run.sharded:  # FSDP2: reduce-scatter the gradients on the last micro-batch only
        run.student.set_requires_gradient_sync(sync)
    with acc.autocast(), (nullcontext() if sync or run.sharded else acc.no_sync(run.student)):
        if run.head_in_loss:
            hidden = run.student.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            loss = head_loss(run.loss_fn, hidden, run.student.get_output_embeddings(), target, ids, loss_mask)
        else:
            logits = run.student(input_ids=ids, attention_mask=mask).logits
            loss = run.loss_fn(logits, target, ids, loss_mask)
        acc.backward(loss / run.accumulation)
    return loss.detach() / run.accumulation


@torch.no_grad()
def head_is_plain(model, ids: torch.Tensor) -> bool:
    """True when the model's logits are exactly its LM head applied to its decoder's last hidden
    state (no soft-capping, scaling or extra layers), checked on a few real tokens."""
    head, decoder = model.get_output_embeddings(), getattr(model, "get_decoder", lambda: None)()
    if not isinstance(head, torch.nn.Linear) or decoder is None:
        return False
    try:
        logits = model(input_ids=ids).logits
        hidden = decoder(input_ids=ids).last_hidden_state
    except (TypeError, AttributeError, RuntimeError):
        return False
    if not bool(torch.isfinite(logits).all()):  # a broken student: the first step reports it, in one line
        return False
    return bool(torch.allclose(head(hidden), logits, rtol=1e-4, atol=1e-5 * float(logits.abs().max())))


def _train(run: _Run, step: int, progress: bool) -> tuple[int, bool, bool]:
    """The optimizer loop from `step`; returns (step reached, stopped by the time budget, stopped
    as if killed)."""
    cfg, acc = run.cfg, run.accelerator
    start = time.perf_counter()
    bar = tqdm(total=run.total_steps, initial=step, desc="healing (distillation)", unit="step",
               disable=not progress or not acc.is_main_process)
    try:
        while step < run.total_steps:
            if cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes:
                log.warning("time budget of %.1f min spent after %d of %d steps: saving", cfg.max_minutes, step,
                            run.total_steps)
                return step, True, False
            if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
                return step, False, True
            step_loss = sum(_micro_batch_loss(run, step, j) for j in range(run.accumulation))
            if cfg.max_grad_norm:
                acc.clip_grad_norm_(run.student.parameters(), cfg.max_grad_norm)
            lr = run.scheduler.get_last_lr()[0]
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value = float(acc.reduce(step_loss, reduction="mean")) if acc.num_processes > 1 else float(step_loss)
            if not math.isfinite(loss_value):  # every rank sees the reduced value: all stop together
                raise DivergedError(f"healing {cfg.student} diverged at step {step}: the training loss is {loss_value}; "
                                    "lower --heal-lr / --lr, or check the student's weights and dtype")
            _record(run, step, {"train/loss": loss_value, "train/lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == run.total_steps) and len(run.held):
                _record(run, step, {"heldout/loss": heldout_loss(acc.unwrap_model(run.student), run.held)})
            if cfg.save_every and (step % cfg.save_every == 0 or step == run.total_steps):
                weights, optim = capture(acc.unwrap_model(run.student), run.optimizer, run.trainable_names,
                                         run.sharded, acc.is_main_process)
                if acc.is_main_process:
                    save_state(run.paths.state / "latest", weights, optim, run.scheduler.state_dict(), step,
                               cfg.fingerprint(), {"curve": run.curve})
        return step, False, False
    finally:
        bar.close()


def _record(run: _Run, step: int, values: dict[str, float]) -> None:
    """Into the curve kept in healing.json (and the resumable state) and the tracker, if any."""
    if "train/loss" in values:
        run.curve["train"].append({"step": step, "loss": values["train/loss"], "lr": values["train/lr"]})
    if "heldout/loss" in values:
        run.curve["heldout"].append({"step": step, "loss": values["heldout/loss"]})
    if run.cfg.report_to != "none":
        run.accelerator.log(values, step=step)


def _accelerator(cfg: HealConfig, logging_dir: Path | None):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else \
        ("bf16" if torch.cuda.is_available() else "no")
    # cpu=True on a machine without CUDA: without it accelerate forms no process group on CPU and
    # every launched process would heal on its own.
    kwargs = dict(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                  log_with=None if logging_dir is None else cfg.report_to,
                  project_dir=None if logging_dir is None else str(logging_dir))
    try:
        with accelerate_without_fsdp():
            accelerator = Accelerator(**kwargs)
    except ValueError:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise CBOPruneError("mixed precision is fixed for a launched run: set it in the accelerate "
                                "config") from None
        # One process healing several models in turn (a library caller) with another precision:
        # accelerate keeps its state per process, so start it afresh.
        AcceleratorState._reset_state()
        with accelerate_without_fsdp():
            accelerator = Accelerator(**kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise CBOPruneError(f"launched as {launched} processes but accelerate formed a group of "
                            f"{accelerator.num_processes}: check the accelerate config")
    if accelerator.distributed_type.name in ("DEEPSPEED", "MEGATRON_LM"):
        raise CBOPruneError(f"cboprune heal does not support {accelerator.distributed_type.name}: shard with "
                            "FSDP instead (--fsdp, or an accelerate config with distributed_type FSDP); see "
                            "docs/healing.md")
    return accelerator


def _optimizer(cfg: HealConfig, params: list) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise CBOPruneError("--optim adamw8bit needs bitsandbytes: pip install 'cboprune[gpu]' (or --optim "
                            "adamw)") from None
    # Tensors under 4,096 elements (norms, biases) keep 32-bit moments, as bitsandbytes advises.
    return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _prepare_run(cfg: HealConfig, accelerator, student, train: TokenizedSet, held: TokenizedSet, teacher, cache,
                 paths: _Paths, accumulation: int, total_steps: int) -> _Run:
    """LoRA / checkpointing on the student, optimizer, schedule, loss, all through accelerate."""
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        student = get_peft_model(student, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                     target_modules=cfg.lora_targets, task_type="CAUSAL_LM"))
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora:
            student.enable_input_require_grads()
    trainable_names = [n for n, p in student.named_parameters() if p.requires_grad]
    if cfg.fsdp:  # before the optimizer, which must hold the sharded parameters
        student = shard_student(student, accelerator.device)
    optimizer = _optimizer(cfg, [p for p in student.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, max(1, round(cfg.warmup_ratio * total_steps)), cfg.min_lr_ratio))
    if not cfg.fsdp:  # accelerate would wrap the sharded model in DDP
        student, optimizer = accelerator.prepare(student, optimizer)
    vocab = accelerator.unwrap_model(student).get_output_embeddings().weight.shape[0]
    chunk = cfg.loss_chunk_tokens if cfg.loss_chunk_tokens is not None else max(1, AUTO_CHUNK_LOGITS // vocab)
    run = _Run(cfg, accelerator, student, optimizer, scheduler, DistillationLoss(cfg.temperature, cfg.kd_weight,
               chunk_tokens=chunk or None), train, held, teacher, cache, paths, trainable_names, accumulation,
               total_steps, {"train": [], "heldout": []}, sharded=cfg.fsdp)
    # The LM head inside the chunked loss: never the full logits. Not through a DDP wrapper, whose
    # forward must run for gradient synchronisation, nor of a sharded one, whose root gathers the head.
    run.head_in_loss = bool(chunk) and accelerator.num_processes == 1 and not cfg.fsdp and \
        head_is_plain(student, train.input_ids[:1, :8].to(accelerator.device))
    return run


def heal(cfg: HealConfig, *, progress: bool = True, teacher_model=None) -> dict[str, Any]:
    """Distill `cfg.teacher` into the pruned `cfg.student`; save the healed checkpoint to
    `cfg.output_dir` with `removal.json` (copied), `healing.json` (losses before/after, the loss
    curve) and `healing_curve.png`.

    teacher_model: an already loaded teacher to reuse across calls (else `cfg.teacher` is loaded).
    With `cfg.teacher_cache` the teacher's top-k outputs are computed once per sample into that
    directory and every later student healed on the same data reuses them (see heal.cache).
    """

    if fsdp_requested(cfg.fsdp) and not cfg.fsdp:  # accelerate launch with an FSDP config
        cfg = replace(cfg, fsdp=True)
    cfg.validate()
    paths = check_output_paths(cfg)
    resume_from = _resume_state(cfg, paths)
    logging_dir = _check_tracker(cfg)
    items = read_distillation_items(cfg.data)  # bad data: one line before any model loads

    check_seq_len(cfg.seq_len, load_config(cfg.student))  # positions past the context were never trained
    accelerator = _accelerator(cfg, logging_dir)
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    student_loaded = models.load_model(cfg.student, dtype="float32", device=str(device))
    student, tokenizer = student_loaded.model, student_loaded.tokenizer
    train, held = load_distillation_data(cfg.data, tokenizer, seq_len=cfg.seq_len,
                                         heldout_fraction=cfg.heldout_fraction, max_samples=cfg.max_samples,
                                         heldout_samples=cfg.heldout_samples, loss_on=cfg.loss_on, seed=cfg.seed,
                                         items=items)
    world = accelerator.num_processes
    if cfg.global_batch_size % (cfg.micro_batch_size * world):
        raise CBOPruneError(f"global_batch_size {cfg.global_batch_size} must be a multiple of micro_batch_size x "
                            f"processes = {cfg.micro_batch_size * world}")
    accumulation = cfg.global_batch_size // (cfg.micro_batch_size * world)
    total_steps = cfg.max_steps or max(1, math.floor(cfg.epochs * math.ceil(len(train) / cfg.micro_batch_size)
                                                     / (accumulation * world)))
    teacher, cache, teacher_precision = _setup_teacher(cfg, accelerator, train, held,
                                                       total_steps * accumulation * world, teacher_model)
    vocab = student.get_output_embeddings().weight.shape[0]
    if teacher is not None and vocab != teacher.get_output_embeddings().weight.shape[0]:
        raise CBOPruneError("student and teacher have different vocabularies: the teacher must be the model "
                            "the student was pruned from")
    before = _heldout_metrics(student, teacher, cache, held, with_teacher=True) if cfg.heldout_eval == "full" else {}
    if "teacher" in before:  # the reference every heal is judged against: never a NaN
        require_finite(before["teacher"], "the held-out loss", f"the teacher {cfg.teacher}", "before healing")

    run = _prepare_run(cfg, accelerator, student, train, held, teacher, cache, paths, accumulation, total_steps)
    step = 0
    if resume_from is not None:
        # Sharded: rank 0 reads the tensors and broadcasts them into the shards.
        saved = read_state(resume_from, cfg.fingerprint(), tensors=not cfg.fsdp or accelerator.is_main_process)
        restore(accelerator.unwrap_model(run.student), run.optimizer, saved.weights, saved.optimizer,
                run.trainable_names, cfg.fsdp, str(resume_from))
        try:
            run.scheduler.load_state_dict(saved.meta["scheduler"])
        except (KeyError, ValueError, TypeError) as e:
            raise CBOPruneError(f"heal state {resume_from} has a malformed scheduler state ({e}): delete it to "
                                "start over") from None
        torch.set_rng_state(saved.rng)
        step = saved.step
        run.curve = saved.meta.get("curve") or run.curve
        log.info("resumed from step %d", step)
    if logging_dir is not None:
        accelerator.init_trackers("cboprune-heal", config={k: v for k, v in asdict(cfg).items()
                                                           if isinstance(v, (int, float, str, bool))})
    run.student.train()
    start = time.perf_counter()
    step, stopped_early, killed = _train(run, step, progress)
    if killed:
        return {"stopped_at_step": step}
    seconds = time.perf_counter() - start

    model = accelerator.unwrap_model(run.student)
    if cfg.lora:
        model = model.merge_and_unload()
    after = _heldout_metrics(model, teacher, cache, held, ce_only=cfg.heldout_eval == "after-ce")
    if "student" in after and not math.isfinite(after["student"]):  # the last update broke the weights
        raise DivergedError(f"healing {cfg.student} diverged at step {step}: the held-out loss after healing is "
                            f"{after['student']}; lower --heal-lr / --lr, or check the student's weights and dtype")
    report = _report(run, teacher_precision, step, stopped_early, before, after, seconds)
    if cfg.fsdp:  # gather the shards into an unsharded copy of the student, on the main process only
        weights = gathered_weights(model)
        model = None
        if accelerator.is_main_process:
            model = models.load_model(cfg.student, dtype="float32", device="cpu", tokenizer=False).model
            model.load_state_dict(weights)
    if accelerator.is_main_process:
        student_removal = Path(student_loaded.checkpoint_dir or "") / REMOVAL_FILE
        provenance = read_json_object(student_removal, "restore it or delete it") if student_removal.is_file() else {}
        model.config.use_cache = True
        model.to(_save_dtype(cfg, student_loaded.checkpoint_dir))
        _write_output(paths, model, tokenizer, provenance, report, cfg.overwrite)
        shutil.rmtree(paths.state, ignore_errors=True)
    accelerator.wait_for_everyone()  # no rank returns before the output exists
    if logging_dir is not None:
        accelerator.end_training()
    return report


def _report(run: _Run, teacher_precision: str, step: int, stopped_early: bool, before: dict, after: dict,
            seconds: float) -> dict[str, Any]:
    """What healing.json says about a finished run."""
    cfg = run.cfg
    return {
        "cboprune_version": __version__,
        "student": cfg.student,
        "teacher": cfg.teacher,
        "teacher_precision": teacher_precision,
        "teacher_samples_computed": getattr(run.cache, "teacher_passes", None),
        "config": asdict(cfg),
        "steps": step,
        "planned_steps": run.total_steps,
        "processes": run.accelerator.num_processes,
        "sharding": "fsdp2" if run.sharded else None,
        "distillation_loss": "lm-head-in-loss" if run.head_in_loss else
        f"chunked ({run.loss_fn.chunk_tokens} tokens)" if run.loss_fn.chunk_tokens else "plain",
        "stopped_by_time_budget": stopped_early,
        "train_samples": len(run.train),
        "heldout_samples": len(run.held),
        # what the run cost, for selection budgets (the heal judge): student forward + backward over
        # `train` positions, one forward per held-out evaluation over `heldout` tokens
        "token_positions": {"train": _trained_positions(run, step), "heldout": int(run.held.attention_mask.sum())
                            if len(run.held) else 0},
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "gap_closed": _gap_closed(before, after),
        "train_loss_first_last": [run.curve["train"][0]["loss"], run.curve["train"][-1]["loss"]]
        if run.curve["train"] else None,
        "curve": run.curve,
        "seconds": round(seconds, 1),
    }


def _trained_positions(run: _Run, steps: int) -> int:
    """Token positions of every micro-batch of every process in `steps` optimizer steps (batches are
    cut to their longest sample, as in `_micro_batch_loss`)."""
    cfg, world = run.cfg, run.accelerator.num_processes
    total = 0
    for index in range(steps * run.accumulation * world):
        rows = _micro_batch_indices(len(run.train), cfg.micro_batch_size, cfg.seed, index)
        total += len(rows) * int(run.train.attention_mask[rows].sum(1).max())
    return total


def _heldout_metrics(model, teacher, cache, held: TokenizedSet, with_teacher: bool = False,
                     ce_only: bool = False) -> dict[str, float]:
    """Held-out cross-entropy of the model (and the teacher), and KL(teacher || model); from a cache
    the KL is its top-k approximation (`kl_to_teacher_topk`)."""
    if not len(held):
        return {}
    out = {"student": heldout_loss(model, held)}
    if ce_only:
        return out
    if cache is not None:
        out["kl_to_teacher_topk"] = heldout_loss(model, held, cache=cache)
        if with_teacher:
            out["teacher"] = _teacher_heldout_ce(cache, held)
        return out
    out["kl_to_teacher"] = heldout_loss(model, held, teacher=teacher)
    if with_teacher:
        out["teacher"] = heldout_loss(teacher, held)
    return out


def _gap_closed(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Fraction of the student-teacher held-out loss gap that healing closed."""
    if not before or not after or before["student"] <= before["teacher"]:
        return None
    return (before["student"] - after["student"]) / (before["student"] - before["teacher"])
