"""The distillation loss, on its own: forward KL on temperature-softened logits, optionally mixed
with cross-entropy on the data, averaged over the tokens the loss mask selects.

Memory: the plain formula keeps about six fp32 `[B, S, V]` tensors alive for the backward pass
(upcast logits, both log-softmaxes, the teacher probabilities, their difference, the product); at a
128k vocabulary that is GBs per micro-batch. `DistillationLoss(chunk_tokens=n)` computes the same
per-token formula on `n` selected tokens at a time, takes each chunk's gradient with respect to the
student logits at once, and keeps only that gradient (in the logits' dtype) for the backward pass:
the fp32 temporaries never exceed one chunk. Tokens outside the loss mask are skipped entirely.
`head_loss` goes one step further and runs the LM head inside the chunks, so the student's full
logits are never held at all (see docs/healing.md for the measured peaks).

The teacher is either dense logits `[B, S, V]` or a `SparseTeacher` (top-k log-probabilities plus
the log of the remaining mass, as cached by `cboprune.heal.cache`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SparseTeacher:
    """Teacher distribution at temperature T kept as its top-k tokens plus the tail.

    indices: [B, S, k] token ids; logprobs: [B, S, k] log p_T of those tokens; tail_logprob: [B, S]
    log of the probability mass outside the top k (-inf when there is none)."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor

    def rows(self, b: torch.Tensor, t: torch.Tensor) -> SparseTeacher:
        return SparseTeacher(self.indices[b, t], self.logprobs[b, t], self.tail_logprob[b, t])


def _kl_dense(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    """Per-token KL(p_t^T || p_s^T); s, t: [..., V] logits -> [...]."""
    log_p_s = F.log_softmax(s / T, dim=-1)
    log_p_t = F.log_softmax(t.float() / T, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def _kl_sparse(s: torch.Tensor, t: SparseTeacher, T: float) -> torch.Tensor:
    """Per-token KL between the teacher and the student, both coarsened to k + 1 bins (the teacher's
    top-k tokens and "everything else"); s: [..., V] logits -> [...]. A lower bound of the full KL
    that is exact when the teacher's tail mass is 0."""
    z = s / T
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)  # [..., 1]
    log_s_top = z.gather(-1, t.indices.long()) - log_z  # [..., k]
    log_t = t.logprobs.float()
    top = (log_t.exp() * (log_t - log_s_top)).sum(-1)
    if t.indices.shape[-1] >= s.shape[-1]:  # the "top k" is the whole vocabulary: no tail
        return top
    log_s_tail = torch.logsumexp(z.scatter(-1, t.indices.long(), float("-inf")), dim=-1) - log_z[..., 0]
    tail = t.tail_logprob.float()
    tail_term = torch.where(torch.isfinite(tail), tail.exp() * (tail - log_s_tail), torch.zeros_like(tail))
    return top + tail_term


class DistillationLoss(nn.Module):
    """loss = kd_weight * T² * KL(p_teacher^T || p_student^T) + (1 - kd_weight) * CE(student, data).

    Forward KL (teacher as the target distribution), the usual choice for logit distillation of
    pruned models (Minitron). T² keeps gradient scales comparable across temperatures.
    chunk_tokens: None for the plain formula; n > 0 for the memory-lean evaluation (same values and
    gradients up to float rounding).
    """

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0, chunk_tokens: int | None = None):
        super().__init__()
        if temperature <= 0 or not 0.0 <= kd_weight <= 1.0:
            raise ValueError("temperature must be > 0 and kd_weight in [0, 1]")
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1 (or None for the plain formula)")
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.chunk_tokens = chunk_tokens

    def token_losses(self, s: torch.Tensor, teacher, targets: torch.Tensor) -> torch.Tensor:
        """Per-token loss before masking; s: [..., V] fp32 logits, teacher: [..., V] logits or a
        SparseTeacher, targets: [...] -> [...]."""
        total = s.new_zeros(s.shape[:-1])
        if self.kd_weight > 0:
            T = self.temperature
            kl = _kl_sparse(s, teacher, T) if isinstance(teacher, SparseTeacher) else _kl_dense(s, teacher, T)
            total = total + self.kd_weight * T * T * kl
        if self.kd_weight < 1:
            ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), targets.reshape(-1), reduction="none")
            total = total + (1 - self.kd_weight) * ce.reshape(targets.shape)
        return total

    def forward(self, student_logits: torch.Tensor, teacher, input_ids: torch.Tensor,
                loss_mask: torch.Tensor) -> torch.Tensor:
        """student_logits: [B, S, V]; teacher: logits [B, S, V], a SparseTeacher or None (kd_weight 0);
        input_ids, loss_mask: [B, S]. Position t predicts token t+1, so a token counts when loss_mask
        marks it as a target."""
        if self.chunk_tokens is not None:
            if torch.is_grad_enabled() and student_logits.requires_grad:
                return _ChunkedLoss.apply(student_logits, self, teacher, input_ids, loss_mask)
            return _chunked(student_logits, self, teacher, input_ids, loss_mask, want_grad=False)[0]
        s = student_logits[:, :-1].float()  # [B, S-1, V]
        weights = loss_mask[:, 1:].float()  # [B, S-1]
        if isinstance(teacher, SparseTeacher):
            teacher = SparseTeacher(teacher.indices[:, :-1], teacher.logprobs[:, :-1], teacher.tail_logprob[:, :-1])
        elif teacher is not None:
            teacher = teacher[:, :-1]
        per_token = self.token_losses(s, teacher, input_ids[:, 1:])
        return (per_token * weights).sum() / weights.sum().clamp_min(1.0)


def _chunked(student_logits: torch.Tensor, loss: DistillationLoss, teacher, input_ids: torch.Tensor,
             loss_mask: torch.Tensor, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss value, its gradient with respect to student_logits or None), `chunk_tokens` tokens at a time."""
    weights = loss_mask[:, 1:].float()  # [B, S-1]
    denom = weights.sum().clamp_min(1.0)
    b_idx, t_idx = weights.nonzero(as_tuple=True)  # only the tokens that count
    grad = torch.zeros_like(student_logits) if want_grad else None  # [B, S, V], the logits' dtype
    total = torch.zeros((), dtype=torch.float32, device=student_logits.device)
    for lo in range(0, b_idx.numel(), loss.chunk_tokens):
        b, t = b_idx[lo:lo + loss.chunk_tokens], t_idx[lo:lo + loss.chunk_tokens]
        if isinstance(teacher, SparseTeacher):
            chunk_teacher = teacher.rows(b, t)
        else:
            chunk_teacher = None if teacher is None else teacher[b, t]  # [c, V]
        with torch.enable_grad():
            s = student_logits[b, t].detach().float().requires_grad_(want_grad)  # [c, V]
            value = (loss.token_losses(s, chunk_teacher, input_ids[b, t + 1]) * (weights[b, t] / denom)).sum()
            if want_grad:
                (g,) = torch.autograd.grad(value, s)
                grad[b, t] = g.to(grad.dtype)
        total += value.detach()
    return total, grad


class _ChunkedLoss(torch.autograd.Function):
    """The chunked loss as one autograd node: its gradient is computed in the forward pass and kept."""

    @staticmethod
    def forward(ctx, student_logits, loss, teacher, input_ids, loss_mask):
        total, grad = _chunked(student_logits, loss, teacher, input_ids, loss_mask, want_grad=True)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # In place: the saved gradient is the size of the logits and is used once (no retain_graph).
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None


def head_loss(loss: DistillationLoss, hidden: torch.Tensor, head: nn.Linear, teacher, input_ids: torch.Tensor,
              loss_mask: torch.Tensor) -> torch.Tensor:
    """`loss(head(hidden), teacher, ...)` without ever holding the student's full logits: the output
    layer runs `loss.chunk_tokens` tokens at a time and its gradients (hidden states, weight, bias)
    are accumulated chunk by chunk. hidden: [B, S, D] final hidden states; head: the LM head [V, D].
    Only for models whose logits are exactly `head(hidden)` (no soft-capping or scaling)."""
    if loss.chunk_tokens is None:
        raise ValueError("head_loss needs a DistillationLoss with chunk_tokens")
    return _HeadLoss.apply(hidden, head.weight, head.bias, loss, teacher, input_ids, loss_mask)


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, loss, teacher, input_ids, loss_mask):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.to(dtype)  # [V, D]; no copy unless autocast changes the dtype
        bias_c = None if bias is None else bias.to(dtype)
        weights = loss_mask[:, 1:].float()  # [B, S-1]
        denom = weights.sum().clamp_min(1.0)
        b_idx, t_idx = weights.nonzero(as_tuple=True)
        grad_h = torch.zeros_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for lo in range(0, b_idx.numel(), loss.chunk_tokens):
                b, t = b_idx[lo:lo + loss.chunk_tokens], t_idx[lo:lo + loss.chunk_tokens]
                h = hidden[b, t].to(dtype)  # [c, D]
                chunk_teacher = teacher.rows(b, t) if isinstance(teacher, SparseTeacher) else \
                    None if teacher is None else teacher[b, t]
                with torch.enable_grad():
                    s = F.linear(h, w, bias_c).float().requires_grad_()  # [c, V]
                    value = (loss.token_losses(s, chunk_teacher, input_ids[b, t + 1]) * (weights[b, t] / denom)).sum()
                    (g,) = torch.autograd.grad(value, s)  # [c, V] fp32
                grad_h[b, t] = (g.to(dtype) @ w).to(grad_h.dtype)
                grad_w.addmm_(g.t(), h.float())
                if grad_b is not None:
                    grad_b += g.sum(0)
                total += value.detach()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), grad_b.to(bias.dtype) if grad_b is not None
                              else torch.empty(0))
        ctx.has_bias = bias is not None
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        go = grad_output.float()
        return (grad_h.mul_(go.to(grad_h.dtype)), grad_w.mul_(go.to(grad_w.dtype)),
                grad_b.mul_(go.to(grad_b.dtype)) if ctx.has_bias else None, None, None, None, None)
