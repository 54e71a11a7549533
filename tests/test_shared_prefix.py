"""Shared-prefix configuration losses equal the plain evaluation, on every architecture family."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cboprune.data.calibration import CalibrationSet
from cboprune.models.masked import configurations_nll, n_blocks
from cboprune.models.forward_loss import _TARGET_ROWS_OK, per_sample_loss, sample_losses
from cboprune.models.shared_prefix import _VERDICT, layer_cost
from conftest import tiny_llama
from test_architectures import FAMILIES, VOCAB, tiny


def _calibration(n: int = 6, seq: int = 10, seed: int = 3) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding in one sample
    mask[4, 5:] = 0
    return CalibrationSet(ids, mask, source="random")


def _configs(n: int) -> list[tuple[int, ...]]:
    pairs = list(itertools.combinations(range(n), 2))
    return [()] + [(i,) for i in range(n)] + pairs + [(0, 2, n - 1), (1, n - 2, n - 1)]


def test_layer_cost_of_the_pair_configurations():
    shared, plain = layer_cost(_configs(30)[:466], 30)
    assert plain == 466 * 30
    assert shared < 0.4 * plain  # the trie shares about two thirds of the layer work


@pytest.mark.parametrize("model_type", [f.model_type for f in FAMILIES])
def test_shared_prefix_equals_plain(model_type):
    model = tiny(model_type)
    calib = _calibration()
    configs = _configs(n_blocks(model))
    plain = configurations_nll(model, calib, configs, batch_size=4, prefix_reuse=False)
    shared = configurations_nll(model, calib, configs, batch_size=4, prefix_reuse=True)
    np.testing.assert_allclose(shared, plain, rtol=0, atol=1e-6)
    assert model in _VERDICT


def test_shared_prefix_is_used_and_exact_on_llama():
    model = tiny_llama(n_layers=8)
    calib = _calibration(seed=5)
    configs = _configs(8)
    plain = configurations_nll(model, calib, configs, batch_size=3, prefix_reuse=False)
    auto = configurations_nll(model, calib, configs, batch_size=3)
    assert _VERDICT[model] is True
    np.testing.assert_allclose(auto, plain, rtol=0, atol=1e-6)
    assert np.ptp(plain) > 0.01  # removing blocks matters: the comparison can fail


def test_a_forward_that_breaks_on_a_short_layer_list_falls_back(monkeypatch):
    model = tiny_llama(n_layers=6)
    inner = model.model
    original = type(inner).forward

    def forward(self, *args, **kwargs):  # a model that needs its full layer list
        if len(self.layers) != self.config.num_hidden_layers:
            raise RuntimeError("layer list shorter than the config")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(inner), "forward", forward)
    calib = _calibration()
    configs = _configs(6)
    shared = configurations_nll(model, calib, configs, batch_size=4, prefix_reuse=True)
    assert _VERDICT[model] is False
    plain = configurations_nll(model, calib, configs, batch_size=4, prefix_reuse=False)
    np.testing.assert_allclose(shared, plain, rtol=0, atol=0)
    assert len(model.model.layers) == 6


WORKER = """
import sys
sys.path.insert(0, {tests!r})
import numpy as np
import torch
torch.set_num_threads(1)
from cboprune.core import distributed
from cboprune.models.masked import configurations_nll
from conftest import tiny_llama
from test_shared_prefix import _calibration, _configs

info = distributed.init_from_env()
values = configurations_nll(tiny_llama(n_layers=6), _calibration(), _configs(6), batch_size=4)
if info.is_main:
    np.save(sys.argv[1], values)
"""


@pytest.mark.slow
def test_torchrun_two_processes_gloo_split_configurations(tmp_path):
    """Under torchrun the configurations are split across processes; the gathered values equal one process's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(tests)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tests.parent))
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "values.npy"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    single = configurations_nll(tiny_llama(n_layers=6), _calibration(), _configs(6), batch_size=4)
    np.testing.assert_allclose(np.load(out), single, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", [f.model_type for f in FAMILIES])
def test_logits_at_target_positions_equal_the_full_head(model_type):
    model = tiny(model_type).eval()
    calib = _calibration(seed=7)
    ids, mask = calib.input_ids, calib.attention_mask
    _TARGET_ROWS_OK.pop(model, None)
    with torch.no_grad():
        full = per_sample_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
        rows = sample_losses(model, ids, mask)
    torch.testing.assert_close(rows, full, rtol=0, atol=1e-5)
    assert model in _TARGET_ROWS_OK


def test_a_head_post_processed_across_positions_gets_full_logits():
    model = tiny_llama(n_layers=2).eval()
    calib = _calibration(seed=8)
    ids, mask = calib.input_ids, calib.attention_mask
    with torch.no_grad():
        full = per_sample_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
    # Centre the logits over the positions: a selection of positions changes the answer.
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: out - out.mean(dim=1, keepdim=True))
    try:
        with torch.no_grad():
            ref = per_sample_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
            first = sample_losses(model, ids, mask)
            again = sample_losses(model, ids, mask)
    finally:
        handle.remove()
    assert float((ref - full).abs().max()) > 1e-3  # the post-processing matters: the check can fail
    assert _TARGET_ROWS_OK[model] is False
    torch.testing.assert_close(first, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, ref, rtol=0, atol=1e-6)


def test_a_model_without_an_output_head_module_gets_full_logits(monkeypatch):
    model = tiny_llama(n_layers=2).eval()
    calib = _calibration(seed=9)
    ids, mask = calib.input_ids, calib.attention_mask
    monkeypatch.setattr(type(model), "get_output_embeddings", lambda self: None)
    with torch.no_grad():
        full = per_sample_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)
        rows = sample_losses(model, ids, mask)
    torch.testing.assert_close(rows, full, rtol=0, atol=1e-6)
    assert _TARGET_ROWS_OK[model] is False
