"""Per-sample gate gradients A and the CBO matrix H = AᵀA / m (the paper's empirical Fisher).

The pass costs one forward and one activation-only backward per batch:
- weights are frozen, so autograd computes no weight gradients and starts at the first gate;
- gates have the per-sample shape [B, N]: the gradient of the summed batch loss with respect to
  row b is sample b's gradient, so one backward pass per batch yields all B rows of A;
- on GPU the forward can run under bf16/fp16 autocast while every gate gradient is reduced in fp32
  and A is kept in fp32 (H in fp64);
- batches are length-bucketed (samples sorted by length, each batch trimmed to its longest sample)
  and A's rows are written back in sample order, so results never depend on the bucketing;
- optional gradient checkpointing of the decoder layers fits long sequences.

Work is split into shards of whole batches. With `shard_dir` every finished shard is written to
disk atomically and is its own resume marker: a killed run started again with the same arguments
skips the shards on disk and ends with the same A, bit for bit on deterministic kernels. Under
torchrun / accelerate each rank computes a share of the shards and the rows of A are combined with
one all-reduce (rows are disjoint, so the sum is exact): every rank ends with the same H as a single
process.

Variants (`variant=`), all with A, losses and the mean gradient saved alongside:
- "fisher" (default): the paper's empirical Fisher AᵀA/m;
- "centered": the gradient covariance AᵀA/m - ḡḡᵀ, from the same pass;
- "exact": the exact Hessian of the mean loss w.r.t. shared gates at alpha = 1, by N Hessian-vector
  products per batch (double backward; about N times the cost: opt-in).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cboprune.core import distributed
from cboprune.core.choices import AUTOCAST_NAMES, HESSIAN_VARIANTS
from cboprune.core.errors import CBOPruneError
from cboprune.models.gating import GateManager, broadcast_gate
from cboprune.models.architectures import blocks, decoder_layers
from cboprune.models.forward_loss import per_sample_loss
from cboprune.core.outputs import check_output_file, dumps_strict, staged_file

if TYPE_CHECKING:
    from cboprune.data.calibration import CalibrationSet

log = logging.getLogger(__name__)

HESSIAN_FORMAT = "cboprune-hessian/1"
SHARD_FORMAT = "cboprune-hessian-shards/1"
VARIANTS = HESSIAN_VARIANTS
AUTOCAST_DTYPES = dict(zip(AUTOCAST_NAMES, (torch.bfloat16, torch.bfloat16, torch.float16, torch.float16)))
DEFAULT_SHARD_SAMPLES = 256
_FP16_LOSS_SCALE = 2.0 ** 12


# ----------------------------------------------------------------------------- result

@dataclass
class HessianResult:
    """A: [m, N] per-sample gradients dL_s/d alpha; losses: [m] at alpha = 1;
    H_exact: [N, N] exact Hessian of the mean loss (variant "exact" only)."""

    A: np.ndarray
    losses: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    H_exact: np.ndarray | None = None

    @property
    def variant(self) -> str:
        return str(self.meta.get("variant", "fisher"))

    @property
    def H(self) -> np.ndarray:
        """The matrix the solvers use: the variant chosen when computing (default: Fisher)."""
        return self.matrix(self.variant)

    def matrix(self, variant: str = "fisher") -> np.ndarray:
        """[N, N] float64 for any variant this result holds."""
        A = self.A.astype(np.float64)
        if variant == "fisher":
            return A.T @ A / A.shape[0]
        if variant == "centered":
            g = A.mean(axis=0)
            return A.T @ A / A.shape[0] - np.outer(g, g)
        if variant == "exact":
            if self.H_exact is None:
                raise CBOPruneError("this Hessian holds no exact Hessian: recompute it with variant 'exact'")
            return self.H_exact
        raise CBOPruneError(f"unknown Hessian variant {variant!r}: choose one of {', '.join(VARIANTS)}")

    @property
    def grad_mean(self) -> np.ndarray:
        """The mean gradient: the first-order term the paper neglects, saved for comparison."""
        return self.A.astype(np.float64).mean(axis=0)

    @property
    def n_blocks(self) -> int:
        return self.A.shape[1]

    @property
    def block_names(self) -> list[str]:
        return list(self.meta.get("block_names", [f"block {i}" for i in range(self.n_blocks)]))

    @property
    def block_kinds(self) -> list[str]:
        return list(self.meta.get("block_kinds", ["block"] * self.n_blocks))

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.A.astype(np.float32).tobytes())
        if self.variant != "fisher":  # the default variant keeps its historical fingerprint
            h.update(self.variant.encode())
            if self.H_exact is not None:
                h.update(self.H_exact.astype(np.float64).tobytes())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- gates

class _GateMul(torch.autograd.Function):
    """y * g with the gate gradient sum(dy * y) reduced in fp32 (y may be bf16/fp16).

    y: [B, S, D] (any float dtype and device); g: [B] per sample or [] shared, fp32 -> like y
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, g)
        return y * broadcast_gate(g, y)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        y, g = ctx.saved_tensors
        grad_y = dout * broadcast_gate(g, dout) if ctx.needs_input_grad[0] else None
        grad_g = None
        if ctx.needs_input_grad[1]:  # products in y's dtype, accumulated and returned in fp32
            dims = tuple(range(1 if g.dim() == 1 else 0, y.dim()))
            grad_g = (dout * y).sum(dim=dims, dtype=torch.float32).to(g.dtype)
        return grad_y, grad_g


class Fp32GateManager(GateManager):
    """GateManager whose hooks reduce each gate gradient in fp32 on the branch output's device.

    Same gate semantics as `GateManager`; used by the Hessian pass so that A stays fp32-accurate
    under autocast and gates follow the activations across GPUs (device_map="auto").
    """

    def scale(self, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return _GateMul.apply(y, gate)


# ----------------------------------------------------------------------------- work plan

@dataclass(frozen=True)
class WorkPlan:
    """Batches (sample indices) grouped into shards; the unit of resume and of distribution."""

    batches: list[np.ndarray]
    shard_batches: int

    @property
    def n_shards(self) -> int:
        return math.ceil(len(self.batches) / self.shard_batches)

    def shard(self, k: int) -> list[np.ndarray]:
        return self.batches[k * self.shard_batches:(k + 1) * self.shard_batches]

    def digest(self) -> str:
        h = hashlib.sha256(str(self.shard_batches).encode())
        for b in self.batches:
            h.update(np.asarray(b, dtype=np.int64).tobytes() + b"|")
        return h.hexdigest()[:16]


def plan_batches(lengths: np.ndarray, batch_size: int, *, bucket: bool = True,
                 shard_samples: int = DEFAULT_SHARD_SAMPLES) -> WorkPlan:
    """Batches of sample indices: longest first when bucketing (similar lengths share a batch, and a
    batch that does not fit in memory fails at once), else in sample order."""
    if batch_size < 1:
        raise CBOPruneError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(-np.asarray(lengths), kind="stable") if bucket else np.arange(len(lengths))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return WorkPlan(batches, max(1, math.ceil(max(1, shard_samples) / batch_size)))


def assign_shards(plan: WorkPlan, tokens: np.ndarray, world_size: int) -> list[list[int]]:
    """Shards per rank, balanced by token count (longest processing time first; deterministic)."""
    cost = [int(sum(int(tokens[b].max()) * len(b) for b in plan.shard(k))) for k in range(plan.n_shards)]
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for k in sorted(range(plan.n_shards), key=lambda k: (-cost[k], k)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owned[r].append(k)
        load[r] += cost[k]
    return [sorted(o) for o in owned]


# ----------------------------------------------------------------------------- one batch

@contextlib.contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Weights frozen (no weight gradients) and eval mode; both restored afterwards."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    for p in trainable:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)


@contextlib.contextmanager
def _checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Non-reentrant activation checkpointing of every decoder layer, with the rest of the model in
    eval mode (dropout stays off); the layers' previous state is restored afterwards."""
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint


    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers
        GradientCheckpointingLayer = ()  # noqa: N806
    _, layers = decoder_layers(model)
    if not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
        raise CBOPruneError(f"{type(layers[0]).__name__} does not support gradient checkpointing in this "
                            "transformers version: run without it")
    saved = [(layer.training, layer.__dict__.get("gradient_checkpointing"),
              layer.__dict__.get("_gradient_checkpointing_func")) for layer in layers]
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        layer.training = True  # the layer module only: its children (dropout, attention) stay in eval
    try:
        yield
    finally:
        for layer, (training, gc, fn) in zip(layers, saved):
            layer.training = training
            for name, value in (("gradient_checkpointing", gc), ("_gradient_checkpointing_func", fn)):
                if value is None:
                    layer.__dict__.pop(name, None)
                else:
                    setattr(layer, name, value)


def model_attention_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """The attention mask to give the model: None when every row is right-padded (ones, then zeros).

    Under causal attention a right-padded sample's real tokens never see its padding, so the plain
    causal mask gives them the same outputs, and attention can run the fused causal kernels (flash)
    instead of a masked one. Padding positions then hold garbage that the loss masks out.
    """
    return None if bool((mask[:, 1:] <= mask[:, :-1]).all()) else mask


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where input_ids go: the input embedding's device (also for device_map="auto" models)."""
    return model.get_input_embeddings().weight.device


@dataclass
class _PassSettings:
    variant: str = "fisher"
    autocast: torch.dtype | None = None
    gradient_checkpointing: bool = False
    at_removed: tuple[int, ...] = ()  # expansion point: these gates at 0, the others at 1


def _batch_gradients(model: torch.nn.Module, gates: GateManager, ids: torch.Tensor, mask: torch.Tensor,
                     settings: _PassSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(per-sample gate gradients [b, N] fp32, losses [b] fp64, summed per-sample Hessians [N, N]
    fp64 or None) for one batch, at alpha = 1 (gates of `settings.at_removed` at 0)."""
    device = ids.device
    n = gates.n_blocks
    exact = settings.variant == "exact"
    scale = _FP16_LOSS_SCALE if settings.autocast == torch.float16 else 1.0
    for _ in range(3):
        alpha = torch.ones(ids.shape[0], n, device=device, dtype=torch.float32)
        alpha[:, list(settings.at_removed)] = 0.0
        alpha.requires_grad_(True)
        gates.set(alpha)
        amp = (torch.autocast(device.type, dtype=settings.autocast) if settings.autocast is not None
               else contextlib.nullcontext())
        with torch.enable_grad(), amp, _math_sdpa(exact):
            logits = model(input_ids=ids, attention_mask=model_attention_mask(mask), use_cache=False).logits
            loss = per_sample_loss(logits, ids, mask)  # [b]
            del logits
            (grad,) = torch.autograd.grad(loss.sum() * scale, alpha, create_graph=exact)
            hsum = None
            if exact:  # column i of sum_b Hess(L_b): d(sum_b grad[b, i]) / d alpha, one HVP per gate
                hsum = torch.zeros(n, n, dtype=torch.float64, device=device)
                for i in range(n):
                    (col,) = torch.autograd.grad(grad[:, i].sum(), alpha, retain_graph=i < n - 1)
                    hsum[:, i] = col.double().sum(dim=0)
        grad = grad.detach() / scale
        if scale == 1.0 or torch.isfinite(grad).all():
            return grad.float(), loss.detach().double(), hsum
        scale /= 2.0 ** 6
        log.warning("fp16 gate gradients overflowed: retrying the batch with loss scale %g", scale)
    raise CBOPruneError("gate gradients are not finite under fp16 autocast: use --autocast bfloat16")


def _math_sdpa(enabled: bool):
    """Double backward (the exact variant) needs the math attention kernel (flash kernels have none)."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


# ----------------------------------------------------------------------------- shards on disk

def _shard_path(shard_dir: Path, k: int) -> Path:
    return shard_dir / f"shard-{k:05d}.safetensors"


def _prepare_shard_dir(shard_dir: Path, plan_info: dict[str, Any]) -> None:
    """Create the directory and its plan.json, or check that an existing plan is the same run."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    plan_file = shard_dir / "plan.json"
    if plan_file.is_file():
        try:
            old = json.loads(plan_file.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        diff = sorted(k for k in set(old) | set(plan_info) if old.get(k) != plan_info.get(k))
        if diff:
            raise CBOPruneError(f"shard directory {shard_dir} holds shards of a different run ({', '.join(diff)} "
                                "differ): pass a new --shard-dir, or delete it to start over")
        return
    with staged_file(plan_file) as stage:
        stage.write_text(json.dumps(plan_info, indent=1) + "\n")


def _save_shard(path: Path, tensors: dict[str, np.ndarray], plan_digest: str) -> None:
    from safetensors.numpy import save_file

    with staged_file(path) as stage:  # the rename is the commit: a shard file on disk is complete
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(stage),
                  metadata={"plan": plan_digest})


def _load_shard(path: Path, plan_digest: str) -> dict[str, np.ndarray] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            if (f.metadata() or {}).get("plan") != plan_digest:
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # a corrupt shard is recomputed, not trusted
        log.warning("shard %s is unreadable: recomputing it", path)
        return None


# ----------------------------------------------------------------------------- the pass

@dataclass
class PassOutput:
    A: np.ndarray  # [m, N] fp32, sample order
    losses: np.ndarray  # [m] fp64
    hsum: np.ndarray | None  # [N, N] fp64: sum over samples of per-sample Hessians (exact variant)
    stats: dict[str, Any]


def gate_gradient_pass(model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8,
                       gates: GateManager | None = None, progress: bool = True, variant: str = "fisher",
                       autocast: str | torch.dtype | None = None, gradient_checkpointing: bool = False,
                       bucket: bool = True, shard_dir: str | Path | None = None,
                       shard_samples: int = DEFAULT_SHARD_SAMPLES, distributed_run: bool | None = None,
                       on_shard: Callable[[int, int], None] | None = None,
                       at_removed: Sequence[int] = ()) -> PassOutput:
    """The gate-gradient pass with every option; `compute_hessian` is the usual entry point.

    variant: "fisher" / "centered" (same pass) or "exact" (adds N HVPs per batch).
    autocast: None, "bfloat16" or "float16": forward under autocast, gate gradients and A in fp32.
    bucket: sort samples by length into batches (A's rows stay in sample order).
    shard_dir: stream each finished shard of `shard_samples` samples there and resume from it.
    distributed_run: None = when launched by torchrun/accelerate (the process group is joined).
    on_shard: called as on_shard(shard index, shards finished by this rank) after each new shard.
    at_removed: blocks already switched off: the expansion point of re-linearization (default alpha = 1).
    """
    if variant not in VARIANTS:
        raise CBOPruneError(f"unknown Hessian variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    settings = _PassSettings(variant=variant, autocast=_resolve_autocast(autocast),
                             gradient_checkpointing=gradient_checkpointing,
                             at_removed=tuple(sorted(int(i) for i in at_removed)))
    dinfo = distributed.init_from_env() if (distributed_run or (distributed_run is None and distributed.launched())) \
        else distributed.DistInfo()
    own_gates = gates is None
    gates = gates or Fp32GateManager(model, blocks(model))
    n, m = gates.n_blocks, calibration.n_samples
    lengths = calibration.attention_mask.sum(dim=1).numpy()
    plan = plan_batches(lengths, batch_size, bucket=bucket, shard_samples=shard_samples)
    mine = assign_shards(plan, lengths, dinfo.world_size)[dinfo.rank]
    if dinfo.enabled:
        prints = distributed.all_gather_object(calibration.fingerprint)
        if len(set(prints)) != 1:
            raise CBOPruneError(f"ranks hold different calibration sets {prints}: give every rank the same data")
    shard_path = None
    if shard_dir is not None:
        shard_path = Path(shard_dir)
        _prepare_shard_dir(shard_path, {
            "format": SHARD_FORMAT, "plan": plan.digest(), "calibration": calibration.fingerprint,
            "n_samples": m, "n_blocks": n, "block_names": [b.name for b in gates.blocks], "variant": variant,
            "batch_size": batch_size, "bucket": bucket, "shard_samples": shard_samples,
            "autocast": str(settings.autocast) if settings.autocast else None,
            "at_removed": list(settings.at_removed), "model_type": getattr(model.config, "model_type", ""),
            "model_params": sum(p.numel() for p in model.parameters())})

    A = np.zeros((m, n), dtype=np.float32)
    losses = np.zeros(m, dtype=np.float64)
    hsums = np.zeros((plan.n_shards, n, n), dtype=np.float64) if variant == "exact" else None
    device = _input_device(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats = {"tokens": 0, "padded_tokens": 0, "computed_shards": 0, "resumed_shards": 0}
    my_samples = sum(len(b) for k in mine for b in plan.shard(k))
    start = time.perf_counter()
    try:
        with _frozen(model), _checkpointing(model, gradient_checkpointing):
            bar = tqdm(total=my_samples, desc="per-sample gate gradients", unit="sample",
                       disable=not progress or not dinfo.is_main)
            for k in mine:
                done = _load_shard(_shard_path(shard_path, k), plan.digest()) \
                    if shard_path is not None and _shard_path(shard_path, k).is_file() else None
                if done is None:
                    done = _compute_shard(model, gates, calibration, plan.shard(k), device, settings, stats,
                                          on_batch=bar.update)
                    stats["computed_shards"] += 1
                    if shard_path is not None:
                        _save_shard(_shard_path(shard_path, k), done, plan.digest())
                    if on_shard is not None:
                        on_shard(k, stats["computed_shards"])
                else:
                    stats["resumed_shards"] += 1
                    bar.update(len(done["index"]))
                idx = done["index"].astype(np.int64)
                A[idx] = done["A"]
                losses[idx] = done["losses"]
                if hsums is not None:
                    hsums[k] = done["hsum"]
            bar.close()
    finally:
        gates.set(None)
        if own_gates:
            gates.remove()
    seconds = time.perf_counter() - start
    peak = _peak_memory(device)
    if dinfo.enabled:  # rows (and shard Hessian sums) are disjoint across ranks: the sum is exact
        A = distributed.all_reduce_sum(A)
        losses = distributed.all_reduce_sum(losses)
        if hsums is not None:
            hsums = distributed.all_reduce_sum(hsums)
        for key in ("tokens", "padded_tokens", "computed_shards", "resumed_shards"):
            stats[key] = int(distributed.all_reduce_sum(np.array([stats[key]], dtype=np.int64))[0])
        seconds = distributed.all_reduce_max(seconds)
        peak = {k: distributed.all_reduce_max(v) for k, v in peak.items()}
    hsum = None
    if hsums is not None:
        hsum = np.zeros((n, n), dtype=np.float64)
        for k in range(plan.n_shards):  # fixed order: the same sum for any world size or resume
            hsum += hsums[k]
    stats.update(seconds=seconds, world_size=dinfo.world_size, n_shards=plan.n_shards, **peak)
    stats["tokens_per_second"] = stats["tokens"] / max(seconds, 1e-9)
    return PassOutput(A=A, losses=losses, hsum=hsum, stats=stats)


def _compute_shard(model: torch.nn.Module, gates: GateManager, calibration: CalibrationSet,
                   batches: list[np.ndarray], device: torch.device, settings: _PassSettings,
                   stats: dict[str, Any], on_batch=None) -> dict[str, np.ndarray]:
    rows, grads, losses = [], [], []
    hsum = torch.zeros(gates.n_blocks, gates.n_blocks, dtype=torch.float64)
    for idx in batches:
        index = torch.from_numpy(np.asarray(idx, dtype=np.int64))
        mask = calibration.attention_mask[index]
        width = int(mask.sum(dim=1).max())
        ids = calibration.input_ids[index, :width].to(device)
        mask = mask[:, :width].to(device)
        grad, loss, h = _batch_gradients(model, gates, ids, mask, settings)
        rows.append(index.numpy())
        grads.append(grad.cpu().numpy())
        losses.append(loss.cpu().numpy())
        if h is not None:
            hsum += h.cpu()
        stats["tokens"] += int(mask.sum())
        stats["padded_tokens"] += int(mask.numel())
        if on_batch is not None:  # progress per batch, not per shard
            on_batch(len(idx))
    out = {"index": np.concatenate(rows), "A": np.concatenate(grads).astype(np.float32),
           "losses": np.concatenate(losses)}
    if settings.variant == "exact":
        out["hsum"] = hsum.numpy()
    return out


def _resolve_autocast(autocast: str | torch.dtype | None) -> torch.dtype | None:
    if autocast is None or autocast in ("", "none", "float32", "fp32"):
        return None
    if isinstance(autocast, torch.dtype):
        return autocast
    try:
        return AUTOCAST_DTYPES[autocast]
    except KeyError:
        raise CBOPruneError(f"unknown autocast dtype {autocast!r}: use bfloat16 or float16") from None


def _peak_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory of the pass (allocator), or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def compute_gate_gradients(model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8,
                           gates: GateManager | None = None, progress: bool = True,
                           **options: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample gradients A [m, N] and losses [m], one forward + one backward per batch.

    options: any keyword of `gate_gradient_pass` (autocast, bucket, shard_dir, ...)."""
    out = gate_gradient_pass(model, calibration, batch_size=batch_size, gates=gates, progress=progress,
                             **options)
    return out.A, out.losses


def compute_hessian(model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8,
                    model_name: str = "", progress: bool = True, variant: str = "fisher",
                    **options: Any) -> HessianResult:
    """Run the gate-gradient pass and package A with the metadata `solve` and `prune` need.

    options: autocast, gradient_checkpointing, bucket, shard_dir, shard_samples, distributed_run,
    on_shard (see `gate_gradient_pass`). Every rank of a distributed run returns the same result.
    """
    gates = Fp32GateManager(model, blocks(model))
    n_params = sum(p.numel() for p in model.parameters())
    try:
        out = gate_gradient_pass(model, calibration, batch_size=batch_size, gates=gates, progress=progress,
                                 variant=variant, **options)
    finally:
        gates.remove()
    m = out.A.shape[0]
    H_exact = None
    if out.hsum is not None:
        H_exact = out.hsum / m
        H_exact = (H_exact + H_exact.T) / 2  # HVP columns agree with rows up to rounding
    s = out.stats
    meta = {
        "format": HESSIAN_FORMAT,
        "model": model_name,
        "model_type": model.config.model_type,
        "n_blocks": gates.n_blocks,
        "n_samples": int(m),
        "block_names": [b.name for b in gates.blocks],
        "block_kinds": [b.kind for b in gates.blocks],
        "block_params": [sum(p.numel() for p in b.module.parameters()) for b in gates.blocks],
        "model_params": n_params,
        "calibration": calibration.describe(),
        "variant": variant,
        "batch_size": batch_size,
        "autocast": str(_resolve_autocast(options.get("autocast"))).replace("torch.", "")
        if options.get("autocast") else None,
        "gradient_checkpointing": bool(options.get("gradient_checkpointing", False)),
        "bucket": bool(options.get("bucket", True)),
        "at_removed": sorted(int(i) for i in options.get("at_removed", ())),
        "world_size": s["world_size"],
        "seconds": round(s["seconds"], 2),
        "tokens_per_second": round(s["tokens_per_second"], 1),
        "padding_fraction": round(1 - s["tokens"] / max(s["padded_tokens"], 1), 4),
        "computed_shards": s["computed_shards"],
        "resumed_shards": s["resumed_shards"],
        "mean_loss": float(out.losses.mean()),
    }
    meta.update({k: round(s[k], 3) for k in ("peak_memory_gib", "peak_rss_gib") if k in s})
    log.info("gate gradients (%s): %d samples x %d blocks in %.1f s, %.0f tokens/s, peak %s, %d shard(s) "
             "computed, %d resumed, %d process(es)", variant, m, gates.n_blocks, s["seconds"],
             s["tokens_per_second"], _memory_text(meta), s["computed_shards"], s["resumed_shards"],
             s["world_size"])
    return HessianResult(A=out.A, losses=out.losses, meta=meta, H_exact=H_exact)


def _memory_text(meta: dict[str, Any]) -> str:
    if "peak_memory_gib" in meta:
        return f"{meta['peak_memory_gib']:.2f} GiB GPU"
    if "peak_rss_gib" in meta:
        return f"{meta['peak_rss_gib']:.2f} GiB RSS"
    return "n/a"


def cost_summary(result: HessianResult) -> str:
    """One line: time, token rate and peak memory of the pass that produced `result`."""
    meta = result.meta
    resumed = f", {meta['resumed_shards']} shard(s) resumed" if meta.get("resumed_shards") else ""
    return (f"{meta.get('seconds')} s, {meta.get('tokens_per_second')} tokens/s, peak {_memory_text(meta)}, "
            f"{meta.get('world_size', 1)} process(es){resumed}")


# ----------------------------------------------------------------------------- file

def save_hessian(result: HessianResult, path: str | Path, *, overwrite: bool = True) -> Path:
    """One safetensors file: A, H, grad_mean, losses (and H_exact), metadata as JSON in its header.

    Written atomically through a staging file next to `path` (`cboprune.core.outputs.staged_file`): a
    directory at `path`, or an existing file without overwrite, is refused before anything is
    written; an interrupted save leaves the previous file (or nothing), never a partial one.
    """
    from safetensors.numpy import save_file

    path = check_output_file(path, overwrite)
    tensors = {"A": result.A.astype(np.float32), "H": result.H, "grad_mean": result.grad_mean,
               "losses": result.losses}
    if result.H_exact is not None:
        tensors["H_exact"] = result.H_exact.astype(np.float64)
    metadata = {"cboprune": dumps_strict(result.meta)}
    with staged_file(path, overwrite=overwrite) as stage:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(stage), metadata=metadata)
    return path


def load_hessian(path: str | Path) -> HessianResult:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CBOPruneError(f"Hessian file not found: {path}. Run `cboprune hessian` first or check the path")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["cboprune"])
            A = f.get_tensor("A")
            losses = f.get_tensor("losses")
            H_exact = f.get_tensor("H_exact") if "H_exact" in f.keys() else None
    except Exception as exc:  # safetensors raises several types for a corrupt header
        raise CBOPruneError(f"{path} is not a readable cboprune Hessian file ({type(exc).__name__}): "
                            "recompute it with `cboprune hessian`") from None
    if not isinstance(meta, dict) or meta.get("format") != HESSIAN_FORMAT or A.ndim != 2 \
            or A.shape[1] != meta.get("n_blocks"):
        raise CBOPruneError(f"{path} is not a {HESSIAN_FORMAT} file: recompute it with `cboprune hessian`")
    m, n = A.shape
    if m < 1 or losses.shape != (m,) or (H_exact is not None and H_exact.shape != (n, n)):
        raise CBOPruneError(f"{path} is inconsistent ({m} gradient samples, {losses.size} losses, "
                            f"{n} blocks): recompute it with `cboprune hessian`")
    if not np.isfinite(A).all() or (H_exact is not None and not np.isfinite(H_exact).all()):
        raise CBOPruneError(f"{path} holds non-finite gate gradients (the loss overflowed?): recompute it with "
                            "`cboprune hessian`, in float32 if it ran in half precision")
    return HessianResult(A=A, losses=losses, meta=meta, H_exact=H_exact)
