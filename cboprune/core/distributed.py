"""Data-parallel helpers on top of `torch.distributed`, for runs launched by torchrun or accelerate.

Both launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, so one
`init_process_group` from the environment serves both (gloo on CPU, NCCL on GPU). A single process
without those variables is world size 1 and every helper here is a no-op.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cboprune.core.errors import CBOPruneError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                        str(dist.get_backend()))
    return DistInfo()


def init_from_env(backend: str | None = None) -> DistInfo:
    """Join the process group described by the launcher's environment (idempotent).

    backend: None picks NCCL when CUDA is available, else gloo.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return info()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    # Leave the group before the interpreter tears down: otherwise gloo's threads can abort the
    # process at exit ("terminate called without an active exception", exit code -6), which
    # torchrun reports as a failed run after the work was done (seen in the test suite under load).
    atexit.register(_leave)
    log.info("joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return info()


def _leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_device(spec: str | None) -> str | None:
    """The device string normalized ("cpu", "cuda", "cuda:1", "mps", "auto", None = choose later), or a
    one-line error for a malformed device, a missing GPU or a GPU index that does not exist."""
    if spec is None or str(spec).strip() == "":
        return None
    text = str(spec).strip().lower()
    if text == "auto":
        if not torch.cuda.is_available():
            raise CBOPruneError("--device auto spreads the model over GPUs but none is available: use --device cpu")
        return text
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise CBOPruneError(f"invalid device {spec!r}: use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CBOPruneError(f"device {spec!r} requested but no CUDA GPU is available: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CBOPruneError(f"device {spec!r} does not exist: this machine has {torch.cuda.device_count()} "
                                f"GPU(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
        return text
    backend = getattr(torch, device.type, None) if device.type != "mps" else getattr(torch.backends, "mps", None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise CBOPruneError(f"device {spec!r} is not available on this machine: use cpu or cuda")
    return text


def pick_device(device: str | None) -> str:
    """The device to load onto: as given (checked by `check_device`), else cuda when available, else cpu."""
    return check_device(device) or ("cuda" if torch.cuda.is_available() else "cpu")


def local_device() -> str:
    """This rank's device: cuda:LOCAL_RANK under NCCL, else cpu."""
    d = info()
    if d.backend == "nccl" or (not d.enabled and torch.cuda.is_available()):
        return f"cuda:{d.local_rank}"
    return "cpu"


def _comm_device() -> torch.device:
    return torch.device(f"cuda:{torch.cuda.current_device()}") if info().backend == "nccl" else torch.device("cpu")


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks (same shape and dtype on every rank); returns a new array."""
    if not info().enabled:
        return array
    t = torch.from_numpy(np.ascontiguousarray(array)).to(_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def all_reduce_max(value: float) -> float:
    if not info().enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_object(obj: Any) -> list[Any]:
    if not info().enabled:
        return [obj]
    out: list[Any] = [None] * info().world_size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if info().enabled:
        dist.barrier()


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise CBOPruneError(f"unknown dtype {dtype!r}: use one of {sorted(_DTYPES)}") from None

