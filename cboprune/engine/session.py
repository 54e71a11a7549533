"""The start of every command that works on a model: device, model, block count and kinds, the M
checks that need N, and the calibration samples (split into fitting and held-out parts).

Cheap checks come first: the data file exists before the model loads; M against N right after."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cboprune import data as calibration_data
from cboprune import models
from cboprune.data.calibration import check_data, check_seq_len
from cboprune.core.distributed import pick_device
from cboprune.core.errors import CBOPruneError
from cboprune.models.architectures import blocks, removable_blocks
from cboprune.models.loading import load_config

log = logging.getLogger(__name__)


@dataclass
class Session:
    model: Any  # torch.nn.Module
    tokenizer: Any
    device: str
    block_kinds: list[str]
    fit: Any  # CalibrationSet
    heldout: Any | None
    keep: list[int] | None = None  # normalized keep indices, when loaded with check_model

    @property
    def n_blocks(self) -> int:
        return len(self.block_kinds)


def check_remove(remove: Sequence[int], n_blocks: int, min_kept: int = 1) -> None:
    limit = n_blocks - min_kept
    bad = [m for m in remove if m > limit]
    if bad:
        raise CBOPruneError(f"M = {bad} is too large for N = {n_blocks} blocks: choose M <= {limit}"
                            + (" (a selected method never removes the last block)" if min_kept > 1 else ""))


def check_against_model(cfg, n_blocks: int, block_kinds: list[str] | None = None) -> list[int]:
    """Validate M values, keep indices and `only` kinds for a model with n_blocks (of kinds
    `block_kinds`); return keep normalized."""
    errors = []
    keep = []
    for i in cfg.keep:
        j = i + n_blocks if i < 0 else i
        if not 0 <= j < n_blocks:
            errors.append(f"keep index {i} is outside the model's {n_blocks} blocks")
        keep.append(j)
    removable = n_blocks - len(set(keep))
    restriction = f"keep={cfg.keep}"
    if cfg.only and block_kinds is not None:
        try:
            allowed = removable_blocks(block_kinds, cfg.only, keep=[j for j in keep if 0 <= j < n_blocks])
        except CBOPruneError as exc:
            errors.append(str(exc))
        else:
            removable = len(allowed)
            restriction = f"only={','.join(cfg.only)}" + (f", keep={cfg.keep}" if cfg.keep else "")
    for m in cfg.remove:
        if m >= n_blocks:
            errors.append(f"M = {m} removes the whole model: M must be below N = {n_blocks}")
        elif m > removable:
            errors.append(f"M = {m} exceeds the {removable} removable blocks left after {restriction}")
    if errors:
        raise CBOPruneError("; ".join(errors))
    return sorted(set(keep))


def load_session(cfg, *, remove: Sequence[int] = (), min_kept: int = 1, heldout: int = 0,
                 heldout_hint: str = "or --heldout-samples", check_model: bool = False) -> Session:
    """Model and calibration for `cfg` (a `Config`): `cfg.n_samples` fitting samples and `heldout`
    held-out ones after them. `check_model`: `check_against_model` (M, keep, only) before the
    calibration, which may be minutes of generation; its normalized keep goes to `Session.keep`."""
    check_data(cfg.data)  # a bad data file fails before the model loads
    model_config = load_config(cfg.model)
    check_seq_len(cfg.seq_len, model_config)  # and a length beyond the context, from the config
    if cfg.heal or cfg.heal_steps or cfg.heal_candidates:  # the heals (and the judge's) come later: check now
        check_seq_len(cfg.heal_seq_len or cfg.seq_len, model_config, "--heal-seq-len")
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    loaded = models.load_model(cfg.model, dtype=cfg.dtype, device=device)
    kinds = [b.kind for b in blocks(loaded.model)]
    check_remove(remove, len(kinds), min_kept)
    keep = check_against_model(cfg, len(kinds), kinds) if check_model else None
    calibration = calibration_data.load_calibration(cfg.data, loaded.tokenizer, model=loaded.model, n_samples=cfg.n_samples + heldout,
                                   seq_len=cfg.seq_len, seed=cfg.seed, chat_template=cfg.chat_template,
                                   generation=calibration_data.GenerationSettings(max_new_tokens=cfg.gen_max_new_tokens, seed=cfg.seed))
    if heldout:
        if calibration.n_samples <= cfg.n_samples:
            raise CBOPruneError(f"the calibration data gave {calibration.n_samples} samples, not enough for "
                                f"{cfg.n_samples} fitting + {heldout} held-out ones: lower --n-samples, {heldout_hint}")
        fit, held = calibration.split(cfg.n_samples)
    else:
        fit, held = calibration, None
    return Session(loaded.model, loaded.tokenizer, device, kinds, fit, held, keep)
