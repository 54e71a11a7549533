"""Per-sample gate gradients A and the CBO matrix H = AᵀA / m (the paper's empirical Fisher).

Weights are frozen, so the backward pass computes activation gradients only. Gates have the
per-sample shape [B, N]: the gradient of the summed batch loss with respect to row b is sample b's
gradient, so one backward pass per batch yields all B rows of A.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cboprune.data.calibration import CalibrationSet
from cboprune.errors import CBOPruneError
from cboprune.gating import GateManager

log = logging.getLogger(__name__)

HESSIAN_FORMAT = "cboprune-hessian/1"


def per_sample_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample over its real tokens.

    logits: [B, S, V]; input_ids, attention_mask: [B, S] -> [B]
    """
    targets = input_ids[:, 1:]
    valid = attention_mask[:, 1:].to(logits.dtype)
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, S-1]
    return (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)


@dataclass
class HessianResult:
    """A: [m, N] per-sample gradients dL_s/d alpha; H: [N, N] = AᵀA/m; losses: [m] at alpha = 1."""

    A: np.ndarray
    losses: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def H(self) -> np.ndarray:
        A = self.A.astype(np.float64)
        return A.T @ A / A.shape[0]

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
        import hashlib

        return hashlib.sha256(self.A.astype(np.float32).tobytes()).hexdigest()[:16]


def compute_gate_gradients(model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8,
                           gates: GateManager | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample gradients A [m, N] and losses [m], one forward + one backward per batch."""
    own_gates = gates is None
    gates = gates or GateManager(model)
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    A = np.zeros((calibration.n_samples, gates.n_blocks), dtype=np.float32)
    losses = np.zeros(calibration.n_samples, dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=calibration.n_samples, desc="per-sample gate gradients", unit="sample",
                   disable=not progress)
        for lo, ids, mask in calibration.batches(batch_size):
            ids, mask = ids.to(device), mask.to(device)
            alpha = torch.ones(ids.shape[0], gates.n_blocks, device=device, requires_grad=True)
            gates.set(alpha)
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                loss = per_sample_loss(logits, ids, mask)
                (grad,) = torch.autograd.grad(loss.sum(), alpha)
            A[lo:lo + ids.shape[0]] = grad.float().cpu().numpy()
            losses[lo:lo + ids.shape[0]] = loss.detach().double().cpu().numpy()
            bar.update(ids.shape[0])
        bar.close()
    finally:
        gates.set(None)
        if own_gates:
            gates.remove()
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return A, losses


def compute_hessian(model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8,
                    model_name: str = "", progress: bool = True) -> HessianResult:
    """Run the gate-gradient pass and package A with the metadata `solve` and `prune` need."""
    gates = GateManager(model)
    n_params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    try:
        A, losses = compute_gate_gradients(model, calibration, batch_size=batch_size, gates=gates,
                                           progress=progress)
    finally:
        gates.remove()
    seconds = time.perf_counter() - start
    meta = {
        "format": HESSIAN_FORMAT,
        "model": model_name,
        "model_type": model.config.model_type,
        "n_blocks": gates.n_blocks,
        "n_samples": int(A.shape[0]),
        "block_names": [b.name for b in gates.blocks],
        "block_kinds": [b.kind for b in gates.blocks],
        "block_params": [sum(p.numel() for p in b.module.parameters()) for b in gates.blocks],
        "model_params": n_params,
        "calibration": calibration.describe(),
        "variant": "fisher",
        "seconds": round(seconds, 2),
        "tokens_per_second": round(calibration.n_tokens / max(seconds, 1e-9), 1),
        "mean_loss": float(losses.mean()),
    }
    log.info("gate gradients: %d samples x %d blocks in %.1f s (%.0f tokens/s)", A.shape[0], A.shape[1],
             seconds, meta["tokens_per_second"])
    return HessianResult(A=A, losses=losses, meta=meta)


def save_hessian(result: HessianResult, path: str | Path) -> Path:
    """One safetensors file: A, H, grad_mean, losses, and the metadata as JSON in its header."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"A": result.A.astype(np.float32), "H": result.H, "grad_mean": result.grad_mean,
               "losses": result.losses}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
              metadata={"cboprune": json.dumps(result.meta)})
    os.replace(tmp, path)
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
    except Exception as exc:  # safetensors raises several types for a corrupt header
        raise CBOPruneError(f"{path} is not a readable cboprune Hessian file ({type(exc).__name__}): "
                            "recompute it with `cboprune hessian`") from None
    if meta.get("format") != HESSIAN_FORMAT or A.ndim != 2 or A.shape[1] != meta.get("n_blocks"):
        raise CBOPruneError(f"{path} is not a {HESSIAN_FORMAT} file: recompute it with `cboprune hessian`")
    return HessianResult(A=A, losses=losses, meta=meta)
