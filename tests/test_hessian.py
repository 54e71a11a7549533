"""Gate gradients are true derivatives of the loss; H = AᵀA/m; the Hessian file round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cboprune.data.calibration import CalibrationSet
from cboprune.core.errors import CBOPruneError
from cboprune.models.gating import GateManager
from cboprune.selection.hessian import (
    compute_hessian,
    load_hessian,
    per_sample_loss,
    save_hessian,
)
from cboprune.models.architectures import blocks


def _calibration(m=6, seq=14, vocab=128):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (m, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return CalibrationSet(ids, mask, source="random")


def test_gradients_match_finite_differences(tiny_model):
    # Llama's RMSNorm computes in fp32 even in a double model, so use central differences with
    # Richardson extrapolation at steps large enough to stay above that rounding.
    tiny_model.double()
    cal = _calibration()
    result = compute_hessian(tiny_model, cal, batch_size=4, progress=False)
    assert result.A.shape == (6, 6)
    np.testing.assert_allclose(result.H, result.A.T.astype(np.float64) @ result.A / 6, rtol=1e-12)

    def loss_at(gates, i, delta):
        g = torch.ones(6, dtype=torch.float64)
        g[i] += delta
        gates.set(g)
        logits = tiny_model(input_ids=cal.input_ids, attention_mask=cal.attention_mask).logits
        return per_sample_loss(logits, cal.input_ids, cal.attention_mask).double()

    with torch.no_grad(), GateManager(tiny_model, blocks(tiny_model)) as gates:
        for i in (0, 3, 5):
            d = {h: (loss_at(gates, i, h) - loss_at(gates, i, -h)) / (2 * h) for h in (1e-2, 5e-3)}
            fd = ((4 * d[5e-3] - d[1e-2]) / 3).numpy()
            np.testing.assert_allclose(result.A[:, i], fd, rtol=1e-3, atol=1e-6)


def test_batch_size_does_not_change_A(tiny_model):
    cal = _calibration()
    a = compute_hessian(tiny_model, cal, batch_size=1, progress=False).A
    b = compute_hessian(tiny_model, cal, batch_size=6, progress=False).A
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_weights_stay_trainable_and_untouched(tiny_model):
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    compute_hessian(tiny_model, _calibration(), batch_size=3, progress=False)
    for n, p in tiny_model.named_parameters():
        assert p.requires_grad and p.grad is None and torch.equal(p, before[n])


def test_hessian_file_round_trip(tiny_model, tmp_path):
    result = compute_hessian(tiny_model, _calibration(), batch_size=3, model_name="tiny", progress=False)
    path = save_hessian(result, tmp_path / "h.safetensors")
    back = load_hessian(path)
    np.testing.assert_array_equal(back.A, result.A)
    np.testing.assert_allclose(back.H, result.H)
    assert back.meta["model"] == "tiny" and back.meta["n_blocks"] == 6
    assert back.block_names == [f"model.layers.{i}" for i in range(6)]
    assert back.meta["calibration"]["fingerprint"] == result.meta["calibration"]["fingerprint"]


def test_unreadable_hessian_file(tmp_path):
    bad = tmp_path / "h.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CBOPruneError, match="not a readable cboprune Hessian"):
        load_hessian(bad)
    with pytest.raises(CBOPruneError, match="not found"):
        load_hessian(tmp_path / "missing.safetensors")
