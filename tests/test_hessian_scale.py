"""The Hessian pass at scale: variants, length buckets, checkpointing, kill-and-resume, torchrun (gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, tiny_llama

from cboprune.data.calibration import CalibrationSet
from cboprune.core.errors import CBOPruneError
from cboprune.models.gating import GateManager
from cboprune.selection.hessian import (
    compute_hessian,
    load_hessian,
    per_sample_loss,
    plan_batches,
    save_hessian,
)
from cboprune.models.architectures import blocks

TESTS = Path(__file__).resolve().parent


def _calibration(m=10, seq=16, vocab=128, seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (m, seq), generator=g)
    mask = torch.ones_like(ids)
    lengths = torch.randint(6, seq + 1, (m,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        mask[i, n:] = 0
    return CalibrationSet(ids, mask, source="random")


def test_exact_variant_matches_autograd_hessian():
    model = tiny_llama(n_layers=4).double()
    cal = _calibration(m=5, seq=12)
    result = compute_hessian(model, cal, batch_size=3, progress=False, variant="exact")
    assert result.variant == "exact" and result.H_exact is not None

    from torch.nn.attention import SDPBackend, sdpa_kernel

    def mean_loss(alpha):
        with GateManager(model, blocks(model)) as gates:
            gates.set(alpha)
            logits = model(input_ids=cal.input_ids, attention_mask=cal.attention_mask).logits
            return per_sample_loss(logits, cal.input_ids, cal.attention_mask).mean()

    ones = torch.ones(4, dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        ref = torch.autograd.functional.hessian(mean_loss, ones).numpy()
        grad = torch.autograd.functional.jacobian(mean_loss, ones).numpy()
    # Llama's RMSNorm rounds through fp32 even in a double model: agreement to ~1e-6 relative.
    np.testing.assert_allclose(result.H, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(result.grad_mean, grad, rtol=1e-5, atol=1e-7)
    # the same pass also yields the Fisher and the centered variant
    A = result.A.astype(np.float64)
    np.testing.assert_allclose(result.matrix("fisher"), A.T @ A / 5)
    np.testing.assert_allclose(result.matrix("centered"), A.T @ A / 5 - np.outer(A.mean(0), A.mean(0)))


def test_buckets_keep_sample_order_and_values(tmp_path):
    model = tiny_llama()
    cal = _calibration()
    lengths = cal.attention_mask.sum(1).numpy()
    plan = plan_batches(lengths, 4, bucket=True)
    first = plan.batches[0]
    assert lengths[first].min() >= np.delete(lengths, first).max()  # longest samples batched together
    a = compute_hessian(model, cal, batch_size=4, progress=False, bucket=True)
    b = compute_hessian(model, cal, batch_size=1, progress=False, bucket=False)
    np.testing.assert_allclose(a.A, b.A, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-6)
    assert a.meta["padding_fraction"] <= compute_hessian(model, cal, batch_size=4, progress=False,
                                                         bucket=False).meta["padding_fraction"]
    back = load_hessian(save_hessian(a, tmp_path / "h.safetensors"))
    assert back.meta["tokens_per_second"] > 0 and "peak_rss_gib" in back.meta


def test_gradient_checkpointing_same_A_and_restored():
    model = tiny_llama()
    cal = _calibration()
    plain = compute_hessian(model, cal, batch_size=5, progress=False)
    ckpt = compute_hessian(model, cal, batch_size=5, progress=False, gradient_checkpointing=True)
    np.testing.assert_allclose(ckpt.A, plain.A, rtol=1e-6, atol=1e-8)
    for layer in model.model.layers:
        assert not layer.training and not layer.gradient_checkpointing
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_bf16_autocast_keeps_A_fp32_and_close():
    model = tiny_llama()
    cal = _calibration()
    ref = compute_hessian(model, cal, batch_size=5, progress=False)
    low = compute_hessian(model, cal, batch_size=5, progress=False, autocast="bfloat16")
    assert low.A.dtype == np.float32 and low.meta["autocast"] == "bfloat16"
    rel = np.abs(low.H - ref.H).max() / np.abs(ref.H).max()
    assert rel < 0.05, rel
    with pytest.raises(CBOPruneError, match="autocast"):
        compute_hessian(model, cal, progress=False, autocast="int8")


# ----------------------------------------------------------------------------- subprocess runs

WORKER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    from conftest import tiny_llama
    from cboprune.data.calibration import CalibrationSet
    from cboprune.selection.hessian import compute_hessian, save_hessian
    from cboprune.core import distributed

    out, shard_dir, kill_after = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 128, (10, 16), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(torch.randint(6, 17, (10,), generator=g).tolist()):
        mask[i, n:] = 0
    cal = CalibrationSet(ids, mask, source="random")

    def on_shard(k, done):
        if kill_after and done >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill, right after a shard was committed

    result = compute_hessian(tiny_llama(), cal, batch_size=2, progress=False, shard_dir=shard_dir,
                             shard_samples=4, on_shard=on_shard)
    if distributed.info().is_main:
        save_hessian(result, out)
""")


def _worker(tmp_path: Path) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS)))
    return script


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _reference() -> np.ndarray:
    torch.set_num_threads(1)
    try:
        return compute_hessian(tiny_llama(), _calibration(), batch_size=2, progress=False, shard_samples=4).A
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_H(tmp_path):
    script, shards, out = _worker(tmp_path), tmp_path / "shards", tmp_path / "h.safetensors"
    killed = subprocess.run([sys.executable, str(script), str(out), str(shards), "1"], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in shards.glob("shard-*")) == ["shard-00000.safetensors"]  # 1 of 3 shards
    assert not out.exists()
    resumed = subprocess.run([sys.executable, str(script), str(out), str(shards), "0"], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    result = load_hessian(out)
    assert result.meta["resumed_shards"] == 1 and result.meta["computed_shards"] == 2
    assert len(list(shards.glob("shard-*"))) == 3
    np.testing.assert_array_equal(result.A, _reference())  # bit for bit
    # a different run refuses the directory instead of mixing shards
    with pytest.raises(CBOPruneError, match="different run"):
        compute_hessian(tiny_llama(), _calibration(), batch_size=3, progress=False, shard_dir=shards,
                        shard_samples=4)


@pytest.mark.slow
def test_torchrun_two_processes_gloo_match_single_process(tmp_path):
    script, out = _worker(tmp_path), tmp_path / "h.safetensors"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(out), "", "0"], env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = load_hessian(out)
    assert result.meta["world_size"] == 2
    A = _reference()
    H = A.astype(np.float64).T @ A / A.shape[0]
    np.testing.assert_allclose(result.H, H, rtol=1e-6, atol=1e-6 * np.abs(H).max())
