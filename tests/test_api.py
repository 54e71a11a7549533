"""`cboprune.prune(model, tokenizer, data, n_remove=...)`: the in-memory call (like peft.get_peft_model)."""

from __future__ import annotations

import pytest
import torch

import cboprune
from cboprune.core.errors import CBOPruneError
from cboprune.models.masked import calibration_nll, n_blocks


def _tiny(tiny_checkpoint):
    from cboprune.models import load_model

    return load_model(str(tiny_checkpoint), dtype="float32")


def test_prune_removes_the_verified_best_state_in_place(tiny_checkpoint, shared_data):
    loaded = _tiny(tiny_checkpoint)
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    model, ranking = cboprune.prune(loaded.model, loaded.tokenizer, data, n_remove=2, top=4, n_samples=6,
                                    heldout_samples=3, seq_len=32, batch_size=3)
    assert model is loaded.model and n_blocks(model) == 4 and model.config.num_hidden_layers == 4
    assert ranking.n_remove == 2 and len(ranking.candidates) == 4 and ranking.info.get("verification")
    scores = [c.score for c in ranking.candidates]
    assert scores == sorted(scores)  # re-ranked by held-out loss: the removed state is the best measured
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    # the same selection as removing the ranking's best state from a fresh copy
    fresh = _tiny(tiny_checkpoint)
    from cboprune.models.surgery import remove_blocks

    again = remove_blocks(fresh.model, ranking.best.removed)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_prune_refuses_bad_options_in_one_line_before_any_work(tiny_checkpoint, shared_data, monkeypatch):
    loaded = _tiny(tiny_checkpoint)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration was loaded before the options were checked")

    monkeypatch.setattr("cboprune.api.load_calibration", no_calibration)
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    for kwargs, message in (({"n_remove": 6}, "removes the whole model"), ({"n_remove": 2, "energy": "nope"}, "energy"),
                            ({"n_remove": 2, "pool_size": 3}, "unknown config keys")):
        with pytest.raises(CBOPruneError, match=message) as e:
            cboprune.prune(loaded.model, loaded.tokenizer, data, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(CBOPruneError, match="not found"):
        cboprune.prune(loaded.model, loaded.tokenizer, "missing.jsonl", n_remove=2)
    assert n_blocks(loaded.model) == 6  # nothing removed


@pytest.mark.real_model
def test_prune_on_the_default_model(default_model, shared_data):
    import copy

    from cboprune.data.calibration import load_calibration

    model = copy.deepcopy(default_model.model)
    data = str(shared_data / "calib" / "c4_demo.jsonl")  # plain text: 32 real tokens a sample
    # without re-centring: the default path with it runs on the tiny model above and on the real model in
    # test_real_model.py, and it would double this test's time
    pruned, ranking = cboprune.prune(model, default_model.tokenizer, data, n_remove=8, top=4, n_samples=8,
                                     heldout_samples=4, seq_len=32, batch_size=4, recentre=0)
    assert "recentre" not in ranking.info
    assert n_blocks(pruned) == 22 and len(ranking.best.removed) == 8
    held = load_calibration(data, default_model.tokenizer, n_samples=12, seq_len=32).split(8)[1]
    assert calibration_nll(pruned, held) == pytest.approx(ranking.info["verification"].get(
        "heldout_nll", [c.score for c in ranking.candidates])[0], abs=1e-3)
