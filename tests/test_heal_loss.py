"""The chunked distillation loss equals the plain formula (values and gradients); the top-k teacher
approximation is exact with k = V and a lower bound otherwise."""

from __future__ import annotations

import pytest
import torch

from cboprune.heal.loss import DistillationLoss, SparseTeacher


def _inputs(B=3, S=9, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(B, S, V, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(B, S, V, generator=g)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.ones(B, S)
    mask[0, :4] = 0  # a prompt that does not count
    mask[2, 6:] = 0  # right padding
    return student, teacher, ids, mask


def _value_and_grad(loss, student, teacher, ids, mask):
    value = loss(student, teacher, ids, mask)
    (grad,) = torch.autograd.grad(value, student)
    return value.detach(), grad


def _sparse(teacher, T, k):
    log_p = torch.log_softmax(teacher / T, dim=-1)
    top = log_p.topk(k, dim=-1)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1.0))
    return SparseTeacher(top.indices.to(torch.int32), top.values, tail)


@pytest.mark.parametrize("kd_weight", [1.0, 0.4, 0.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_loss_equals_the_plain_formula(kd_weight, temperature, chunk):
    student, teacher, ids, mask = _inputs()
    plain = _value_and_grad(DistillationLoss(temperature, kd_weight), student, teacher, ids, mask)
    chunked = _value_and_grad(DistillationLoss(temperature, kd_weight, chunk_tokens=chunk), student, teacher, ids,
                              mask)
    assert plain[0] > 0.1
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[1], plain[1], rtol=1e-5, atol=1e-8)
    assert chunked[1][0, :3].abs().max() == 0  # masked targets get no gradient


def test_chunked_loss_scales_with_the_upstream_gradient_and_runs_without_grad():
    student, teacher, ids, mask = _inputs()
    loss = DistillationLoss(2.0, 0.7, chunk_tokens=4)
    (g1,) = torch.autograd.grad(loss(student, teacher, ids, mask) / 4, student)
    (g2,) = torch.autograd.grad(DistillationLoss(2.0, 0.7)(student, teacher, ids, mask) / 4, student)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-8)
    with torch.no_grad():
        torch.testing.assert_close(loss(student, teacher, ids, mask), DistillationLoss(2.0, 0.7)(student, teacher,
                                                                                               ids, mask))


def test_chunked_gradient_keeps_the_logits_dtype():
    student, teacher, ids, mask = _inputs()
    student = student.detach().to(torch.bfloat16).requires_grad_()
    value = DistillationLoss(chunk_tokens=3)(student, teacher.to(torch.bfloat16), ids, mask)
    (grad,) = torch.autograd.grad(value, student)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()


@pytest.mark.parametrize("chunk", [None, 4])
def test_top_k_teacher_is_exact_with_all_tokens_and_a_lower_bound_with_few(chunk):
    student, teacher, ids, mask = _inputs()
    T = 2.0
    dense = _value_and_grad(DistillationLoss(T, chunk_tokens=chunk), student, teacher, ids, mask)
    full = _value_and_grad(DistillationLoss(T, chunk_tokens=chunk), student, _sparse(teacher, T, 37), ids, mask)
    torch.testing.assert_close(full[0], dense[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full[1], dense[1], rtol=1e-4, atol=1e-7)
    few = _value_and_grad(DistillationLoss(T, chunk_tokens=chunk), student, _sparse(teacher, T, 5), ids, mask)
    assert 0 < few[0] < dense[0]
    plain_few = _value_and_grad(DistillationLoss(T), student, _sparse(teacher, T, 5), ids, mask)
    torch.testing.assert_close(few[0], plain_few[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kd_weight", [1.0, 0.4])
@pytest.mark.parametrize("bias", [False, True])
def test_head_inside_the_loss_equals_the_plain_formula(kd_weight, bias):
    from cboprune.heal.loss import head_loss

    torch.manual_seed(0)
    _, teacher, ids, mask = _inputs(V=41)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    head = torch.nn.Linear(16, 41, bias=bias)
    wrt = [hidden, head.weight] + ([head.bias] if bias else [])
    plain = DistillationLoss(1.5, kd_weight)(head(hidden), teacher, ids, mask)
    fused = head_loss(DistillationLoss(1.5, kd_weight, chunk_tokens=4), hidden, head, teacher, ids, mask)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(fused / 3, wrt), torch.autograd.grad(plain / 3, wrt)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_head_check_accepts_llama_and_refuses_soft_capped_logits(tiny_model):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from cboprune.heal.trainer import head_is_plain

    ids = torch.randint(0, 100, (1, 8))
    assert head_is_plain(tiny_model, ids)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           final_logit_softcapping=0.5)).eval()
    assert not head_is_plain(gemma, ids)
