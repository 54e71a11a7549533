"""The distillation loss, on its own: forward KL on temperature-softened logits, optionally mixed
with cross-entropy on the data, averaged over the tokens the loss mask selects."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DistillationLoss(nn.Module):
    """loss = kd_weight * T² * KL(p_teacher^T || p_student^T) + (1 - kd_weight) * CE(student, data).

    Forward KL (teacher as the target distribution), the usual choice for logit distillation of
    pruned models (Minitron). T² keeps gradient scales comparable across temperatures.
    """

    def __init__(self, temperature: float = 1.0, kd_weight: float = 1.0):
        super().__init__()
        if temperature <= 0 or not 0.0 <= kd_weight <= 1.0:
            raise ValueError("temperature must be > 0 and kd_weight in [0, 1]")
        self.temperature = temperature
        self.kd_weight = kd_weight

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """student_logits, teacher_logits: [B, S, V]; input_ids, loss_mask: [B, S]. Position t
        predicts token t+1, so a token counts when loss_mask marks it as a target."""
        s = student_logits[:, :-1].float()
        weights = loss_mask[:, 1:].float()  # [B, S-1]
        denom = weights.sum().clamp_min(1.0)
        total = s.new_zeros(())
        if self.kd_weight > 0:
            t = teacher_logits[:, :-1].float()
            T = self.temperature
            log_p_s = F.log_softmax(s / T, dim=-1)
            log_p_t = F.log_softmax(t / T, dim=-1)
            kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # [B, S-1]
            total = total + self.kd_weight * T * T * (kl * weights).sum() / denom
        if self.kd_weight < 1:
            ce = F.cross_entropy(s.transpose(1, 2), input_ids[:, 1:], reduction="none")
            total = total + (1 - self.kd_weight) * (ce * weights).sum() / denom
        return total
