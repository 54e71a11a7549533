"""Gates reproduce the model at 1, equal block removal at 0, and give exact per-sample gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from cboprune.models.gating import GateManager
from cboprune.selection.hessian import per_sample_loss
from cboprune.models.architectures import blocks
from cboprune.models.surgery import remove_blocks, save_pruned

torch.set_default_dtype(torch.float32)


def _inputs(batch=3, seq=12, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def test_gates_at_one_reproduce_the_model(tiny_model):
    ids = _inputs()
    with torch.no_grad():
        ref = tiny_model(ids).logits
        with GateManager(tiny_model, blocks(tiny_model)) as gates:
            gates.set(torch.ones(gates.n_blocks))
            gated = tiny_model(ids).logits
            gates.set(torch.ones(3, gates.n_blocks))  # per-sample shape
            gated_per_sample = tiny_model(ids).logits
    assert (gated - ref).abs().max() <= 1e-6
    assert (gated_per_sample - ref).abs().max() <= 1e-6


def test_hooks_are_removed_on_exit(tiny_model):
    ids = _inputs()
    with torch.no_grad():
        ref = tiny_model(ids).logits
        with GateManager(tiny_model, blocks(tiny_model)) as gates:
            gates.set(torch.zeros(gates.n_blocks))
            assert (tiny_model(ids).logits - ref).abs().max() > 1e-3
        assert (tiny_model(ids).logits - ref).abs().max() == 0


@pytest.mark.parametrize("removed", [[0], [2], [1, 4], [0, 3, 5]])
def test_gate_zero_equals_pruned_checkpoint(tiny_model, tmp_path, removed):
    ids = _inputs()
    with torch.no_grad(), GateManager(tiny_model, blocks(tiny_model)) as gates:
        gates.set(gates.removal_gates(removed))
        gated = tiny_model(ids).logits
        gates.set(None)
        full = tiny_model(ids).logits
    assert (gated - full).abs().max() > 1e-3, "removing a block must change the logits for this test to mean anything"
    remove_blocks(tiny_model, removed)
    save_pruned(tiny_model, None, tmp_path / "pruned", {"removed": removed})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.num_hidden_layers == 6 - len(removed)
    with torch.no_grad():
        pruned = reloaded(ids).logits
    assert (pruned - gated).abs().max() <= 1e-4


def test_per_sample_gates_are_independent(tiny_model):
    ids = _inputs(batch=2)
    g = torch.ones(2, 6)
    g[0, 1] = 0.0
    g[1, 4] = 0.3
    with torch.no_grad(), GateManager(tiny_model, blocks(tiny_model)) as gates:
        gates.set(g)
        batched = tiny_model(ids).logits
        for b in range(2):
            gates.set(g[b])
            alone = tiny_model(ids[b:b + 1]).logits
            assert (batched[b] - alone[0]).abs().max() <= 1e-5


def test_batched_per_sample_gradients_equal_one_backward_per_sample(tiny_model):
    ids = _inputs(batch=4, seq=16)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding: a shorter sample in the batch
    mask[3, 6:] = 0
    n = 6
    with GateManager(tiny_model, blocks(tiny_model)) as gates:
        alpha = torch.ones(4, n, requires_grad=True)
        gates.set(alpha)
        loss = per_sample_loss(tiny_model(input_ids=ids, attention_mask=mask).logits, ids, mask)
        (batched,) = torch.autograd.grad(loss.sum(), alpha)
        for b in range(4):
            length = int(mask[b].sum())
            one = torch.ones(n, requires_grad=True)
            gates.set(one)
            sid, smask = ids[b:b + 1, :length], mask[b:b + 1, :length]
            single_loss = per_sample_loss(tiny_model(input_ids=sid, attention_mask=smask).logits, sid, smask)
            (single,) = torch.autograd.grad(single_loss.sum(), one)
            rel = (batched[b] - single).norm() / single.norm()
            assert rel <= 1e-5, (b, rel)
    assert batched.abs().min() > 0  # every block matters to every sample in this random model
