"""Sharded healing (FSDP2) and the training state of a run, sharded or not, as whole tensors.

The student is sharded with torch's own FSDP2 (`torch.distributed.fsdp.fully_shard`, one unit
per decoder block plus the root), not through accelerate's FSDP plugin: accelerate turns an FSDP
config into plain data parallel on a machine without CUDA, so its path could not be tested here,
and the same code now runs on CPU (gloo) and GPU (NCCL). `accelerate launch --config_file
fsdp.yaml` still works: its `ACCELERATE_USE_FSDP` switches this path on (`fsdp_requested`).

The resumable state stays the unsharded safetensors + JSON of heal.state (never pickle, so not
torch.distributed.checkpoint, whose metadata file is a pickle): at a save every rank takes part in
gathering full tensors to rank 0's CPU, which writes them; at a resume rank 0 reads them and
broadcasts them into the shards. The saved format is the same with and without sharding.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any

import torch

from cboprune.core.errors import CBOPruneError
from cboprune.models.architectures import decoder_layers

_ACCELERATE_FSDP = "ACCELERATE_USE_FSDP"


def fsdp_requested(flag: bool) -> bool:
    """--fsdp, or an `accelerate launch` whose config asks for FSDP."""
    return flag or os.environ.get(_ACCELERATE_FSDP, "").lower() in ("1", "true", "yes")


@contextmanager
def accelerate_without_fsdp():
    """Hide accelerate's FSDP switch while the Accelerator is built: the sharding is ours, and
    accelerate must see plain processes (it would otherwise wrap the model itself on GPU)."""
    saved = os.environ.pop(_ACCELERATE_FSDP, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[_ACCELERATE_FSDP] = saved


def shard_student(model, device: torch.device):
    """Shard every decoder block and then the rest (embeddings, final norm, head) across all
    processes of the group; parameters become DTensors. Returns the model (sharded in place)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard


    if not dist.is_initialized():
        raise CBOPruneError("--fsdp needs a process group: launch with torchrun or accelerate launch")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in decoder_layers(base)[1]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _numbering(model, trainable_names: list[str]) -> dict[str, int]:
    """Every name of a trainable parameter (tied ones have several) -> its number in the optimizer,
    which was built from the trainable parameters in `trainable_names` order."""
    wanted = set(trainable_names)
    number = {id(p): i for i, p in enumerate(p for n, p in model.named_parameters() if n in wanted)}
    return {n: number[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if id(p) in number}


def capture(model, optimizer, trainable_names: list[str], sharded: bool, is_main: bool
            ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
    """(trainable weights by name, optimizer state dict numbered like torch's) as whole CPU tensors
    on the main process; (None, None) elsewhere. Collective when sharded: every rank must call."""
    if not sharded:
        if not is_main:
            return None, None
        params = dict(model.named_parameters())
        return {n: params[n] for n in trainable_names}, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None, None
    number = _numbering(model, trainable_names)
    state = {number[fqn]: values for fqn, values in optim["state"].items()}
    groups = [{**g, "params": sorted(number[f] for f in g["params"])} for g in optim["param_groups"]]
    return {n: weights[n] for n in trainable_names}, {"state": state, "param_groups": groups}


def restore(model, optimizer, weights: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any] | None,
            trainable_names: list[str], sharded: bool, where: str) -> None:
    """Load saved whole tensors into the model and optimizer. Sharded: collective, and only rank 0
    needs `weights` / `optimizer_state` (the others pass None and receive them by broadcast)."""
    try:
        if not sharded:
            bad = _mismatch(model, weights, trainable_names)
            if bad:
                raise CBOPruneError(f"heal state {where} does not match this model (e.g. {bad}): delete it to "
                                    "start over")
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, value in weights.items():
                    params[name].copy_(value)
            optimizer.load_state_dict(optimizer_state)
            return
        _restore_sharded(model, optimizer, weights, optimizer_state, trainable_names, where)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
        raise CBOPruneError(f"heal state {where} does not fit this run ({str(e).splitlines()[0][:120]}): "
                            "delete it to start over") from None


def _mismatch(model, weights: dict[str, torch.Tensor], trainable_names: list[str]) -> str | None:
    """The first saved or expected tensor name that does not fit the model's trainable parameters
    (missing, extra or of another shape), or None."""
    shapes = {n: p.shape for n, p in model.named_parameters()}
    bad = [n for n, v in weights.items() if shapes.get(n) != v.shape]
    return (bad or sorted(set(weights) ^ set(trainable_names)) or [None])[0]


def _restore_sharded(model, optimizer, weights, optimizer_state, trainable_names, where) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    bad = [_mismatch(model, weights, trainable_names) if weights is not None else None]
    dist.broadcast_object_list(bad, src=0)  # rank 0's verdict (a name or None), so every rank fails alike
    if bad[0]:
        raise CBOPruneError(f"heal state {where} does not match this model (e.g. {bad[0]}): delete it to start over")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, dict(weights) if weights is not None else {}, options=options)
    optim: dict[str, Any] = {}
    if optimizer_state is not None:
        name = {i: n for n, i in _numbering(model, trainable_names).items() if n in trainable_names}
        optim = {"state": {name[i]: dict(v) for i, v in optimizer_state["state"].items()},
                 "param_groups": [{**g, "params": [name[i] for i in g["params"]]}
                                  for g in optimizer_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim, options=StateDictOptions(full_state_dict=True,
                                                                               broadcast_from_rank0=True))


def gathered_weights(model) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded model on the main process's CPU (empty elsewhere).
    Collective: every rank must call."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
