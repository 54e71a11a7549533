"""The loss of one forward pass, per sample: next-token cross-entropy over the real tokens, with the
output head run only where a target exists. Every measurement (masked evaluation, shared prefixes,
the gate-gradient pass, the evaluation scorer) computes its losses here."""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Whether logits computed only at target positions matched the full head, per model (checked once).
_TARGET_ROWS_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def per_sample_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample over its real tokens.

    logits: [B, S, V]; input_ids, attention_mask: [B, S] -> [B] (fp32 at least)
    """
    B, S, V = logits.shape
    # Flat [B*S, V] rows keep a contiguous logits tensor uncopied; the last position of every
    # sample has no target and is ignored.
    targets = torch.cat([input_ids[:, 1:], input_ids.new_full((B, 1), -100)], dim=1)  # [B, S]
    valid = torch.cat([attention_mask[:, 1:], attention_mask.new_zeros((B, 1))], dim=1)
    targets = targets.masked_fill(valid == 0, -100)
    logits = logits.reshape(B * S, V).to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(logits, targets.reshape(-1), reduction="none", ignore_index=-100).view(B, S)
    valid = valid.to(nll.dtype)
    return (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1)


@contextmanager
def head_rows(model: torch.nn.Module, select):
    """Within: the output head sees only some hidden states, `select([B, S, D]) -> [R, D]`, as one
    [1, R, D] batch, so the head (a vocabulary-wide matrix product, the largest single layer of a
    small model) runs on R rows instead of B * S. Yields a list that holds True once the head ran on
    the selection; a head that never runs, or sees another shape, is left untouched (the caller then
    has full logits)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    fired: list[bool] = []
    if head is None:
        yield fired
        return

    def gather(_module, args):
        picked = select(args[0])
        if picked is None:
            return None
        fired.append(True)
        return (picked[None],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        yield fired
    finally:
        handle.remove()


def sample_losses(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  **forward_kwargs) -> torch.Tensor:
    """`per_sample_loss` of one forward pass, with logits only at the positions that have a target.

    Padding and the last position of every sample need no logits; on the 49k-word vocabulary of
    the default model the head is about a fifth of a forward pass, so this saves what padding
    costs there. Checked once per model against the full head (a head whose output is
    post-processed across positions would differ); any mismatch means full logits from then on.
    """
    B, S = input_ids.shape
    verdict = _TARGET_ROWS_OK.get(model)
    if verdict is False:
        return _full_loss(model, input_ids, attention_mask, forward_kwargs)
    valid = torch.cat([attention_mask[:, 1:], attention_mask.new_zeros((B, 1))], dim=1).reshape(-1) > 0
    rows = valid.nonzero().squeeze(1)  # flat positions b * S + t with a next-token target

    def select(hidden):
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, S):
            return None
        return hidden.reshape(B * S, -1).index_select(0, rows.to(hidden.device))

    with head_rows(model, select) as fired:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits
    if not fired or tuple(logits.shape[:2]) != (1, rows.numel()):
        if verdict is None:
            log.debug("logits at target positions only: not available for %s", type(model).__name__)
            _TARGET_ROWS_OK[model] = False
        return (per_sample_loss(logits, input_ids, attention_mask) if tuple(logits.shape[:2]) == (B, S)
                else _full_loss(model, input_ids, attention_mask, forward_kwargs))
    targets = torch.cat([input_ids[:, 1:], input_ids.new_zeros((B, 1))], dim=1).reshape(-1)[rows]
    flat = logits[0].to(torch.promote_types(logits.dtype, torch.float32))
    nll = F.cross_entropy(flat, targets.to(flat.device), reduction="none")  # [R]
    sample = (rows // S).to(nll.device)
    total = nll.new_zeros(B).index_add_(0, sample, nll)
    count = nll.new_zeros(B).index_add_(0, sample, torch.ones_like(nll))
    loss = total / count.clamp_min(1)
    if verdict is None:
        ref = _full_loss(model, input_ids, attention_mask, forward_kwargs)
        ok = bool((loss - ref).abs().max() <= 1e-5 * (1.0 + float(ref.abs().max())))
        _TARGET_ROWS_OK[model] = ok
        if not ok:
            log.info("logits at target positions only are off for %s: they differ from the full head",
                     type(model).__name__)
            return ref
    return loss


def _full_loss(model, input_ids, attention_mask, forward_kwargs) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits
    return per_sample_loss(logits, input_ids, attention_mask)
