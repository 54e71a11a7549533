"""A NaN is never a result (issue 34): the judge's held-out NLL after healing on a Gemma-3-like model
with sliding-window and full attention layers is measured, finite and equal to a fresh evaluation of
the healed checkpoint; every reported metric goes through one guard (`cboprune.core.finite`)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from cboprune.core.errors import CBOPruneError, DivergedError
from cboprune.core.finite import DIVERGED, metric_cell, metric_key, require_finite
from cboprune.core.outputs import dumps_strict


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A random gemma3_text model with the real family's layer pattern (five sliding-window layers,
    then one full-attention layer), the default tokenizer and no chat template (like the GGUF)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

    from cboprune.models.loading import resolve_model_source

    path = tmp_path_factory.mktemp("gemma3") / "tiny"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source("default")[0])
    tokenizer.chat_template = None
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              sliding_window_pattern=6, max_position_embeddings=256,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    assert config.layer_types.count("full_attention") == 1 and "sliding_attention" in config.layer_types
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").unlink(missing_ok=True)
    return path


@pytest.mark.slow
def test_judge_nll_after_healing_is_finite_and_matches_a_fresh_evaluation(tiny_gemma3, shared_data, tmp_path,
                                                                            monkeypatch, caplog):
    """Failed before the fix: the judge healed without measuring the NLL after and logged it as nan."""
    from cboprune.engine import judge
    from cboprune.core.config import Config
    from cboprune.models.masked import calibration_nll
    from cboprune.models import load_model
    from cboprune.core.ranking import Candidate, Ranking
    from cboprune.engine.session import load_session
    from cboprune.selection.verify import measured_nll, verify

    cfg = Config(model=str(tiny_gemma3), data=str(shared_data / "calib" / "alpaca_en_demo.json"), n_samples=6,
                 seq_len=32, batch_size=3, judge_steps=1, heal_seq_len=32)
    session = load_session(cfg, heldout=3)
    assert session.fit.info["rendering"].startswith("plain text")  # no chat template: the report says so
    ranking = verify(session.model, session.heldout,
                     Ranking("cbo-test", 6, 2, [Candidate((1, 2), 0.1, 0), Candidate((3, 4), 0.2, 1)], exact=True))
    kept = tmp_path / "kept"
    original = judge.judge_recipe

    def keeping(*args, **kwargs):
        recipe = original(*args, **kwargs)
        recipe.keep_checkpoints = kept
        return recipe

    monkeypatch.setattr(judge, "judge_recipe", keeping)
    staging = tmp_path / "staging"
    staging.mkdir()
    with caplog.at_level(logging.INFO, logger="cboprune.engine.healing_study"):
        (judged,), text, cost = judge.judge_by_healing(cfg, session, [ranking], staging, 2)
    info = judged.info["heal_judge"]
    assert len(info["heldout_nll_after"]) == 2 and all(math.isfinite(v) for v in info["heldout_nll_after"])
    before = dict(zip([c.removed for c in ranking.candidates], measured_nll(ranking)))
    assert info["heldout_nll_before"] == [before[tuple(r)] for r in info["order"]]
    assert "nan" not in text.lower() and "nan" not in caplog.text.lower()
    for removed, after in zip(info["order"], info["heldout_nll_after"]):
        healed = kept / f"M2-rank{[c.removed for c in ranking.candidates].index(tuple(removed))}-S1"
        fresh = calibration_nll(load_model(str(healed), dtype="float32").model, session.heldout, batch_size=3)
        assert fresh == pytest.approx(after, abs=1e-5)


def test_the_guard_shows_diverged_never_nan_and_sorts_it_last():
    assert metric_cell(float("nan")) == DIVERGED and metric_cell(float("inf")) == DIVERGED
    assert metric_cell(None) == "—" and metric_cell(1.23456) == "1.2346" and metric_cell(2.5, ".2f") == "2.50"
    values = [3.0, float("nan"), None, 1.0, float("inf")]
    assert sorted(values, key=metric_key)[:2] == [1.0, 3.0]
    assert json.loads(dumps_strict({"loss": float("nan"), "ok": 1.5})) == {"loss": None, "ok": 1.5}
    with pytest.raises(CBOPruneError) as e:
        require_finite(float("nan"), "the held-out loss", "model X", "step 3")
    assert str(e.value).count("\n") == 0 and "model X" in str(e.value) and "step 3" in str(e.value)
    assert require_finite(2, "x", "m") == 2.0


def test_a_heal_that_blows_up_is_one_line_naming_the_student_and_the_step(tiny_gemma3, shared_data, tmp_path):
    from cboprune.heal import HealConfig, heal
    from cboprune.models import load_model
    from cboprune.models.surgery import remove_blocks, save_pruned

    loaded = load_model(str(tiny_gemma3), dtype="float32")
    student = tmp_path / "student"
    pruned = remove_blocks(loaded.model, [1])
    with torch.no_grad():  # one broken weight: the first step's loss is NaN
        pruned.model.layers[0].mlp.down_proj.weight[0, 0] = float("inf")
    save_pruned(pruned, loaded.tokenizer, student, {"removed": [1]})
    cfg = HealConfig(student=str(student), teacher=str(tiny_gemma3), output_dir=str(tmp_path / "healed"),
                     data=str(shared_data / "calib" / "alpaca_en_demo.json"), seq_len=32, micro_batch_size=2,
                     global_batch_size=2, max_steps=3, learning_rate=1e-3, warmup_ratio=0.0, max_grad_norm=0.0,
                     max_samples=6, heldout_samples=2)
    with pytest.raises(DivergedError) as e:
        heal(cfg, progress=False)
    message = str(e.value)
    assert "\n" not in message and str(student) in message and "diverged at step" in message
    assert not (tmp_path / "healed").exists()


def test_a_diverged_heal_in_a_study_is_a_diverged_row_not_a_number(tiny_checkpoint, shared_data, tmp_path,
                                                                   monkeypatch):
    """Where a diverged configuration is a legitimate outcome (compare/study heals), it is shown as
    "diverged" in the table and the results file, never as NaN."""
    from cboprune.cli import main

    import cboprune.heal as heal_package

    def exploding(cfg, **kwargs):
        raise DivergedError(f"healing {cfg.student} diverged at step 1: the training loss is nan")

    monkeypatch.setattr(heal_package, "heal", exploding)
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 3)
    out = tmp_path / "cmp"
    assert main(["-q", "compare", "--model", str(tiny_checkpoint), "--data", data, "--n-samples", "6",
                 "--seq-len", "32", "--batch-size", "3", "--remove", "2", "--methods", "bi,last-m",
                 "--heal-steps", "1", "--heal-seq-len", "32", "--heal-micro-batch-size", "2",
                 "--heal-global-batch-size", "2", "--heal-heldout-samples", "8", "--tasks", f"file:{text}", "--ppl-limit", "1",
                 "--max-length", "64", "--no-speedup", "--output-dir", str(out)]) == 0
    raw = (out / "results.json").read_text()
    assert "NaN" not in raw and "Infinity" not in raw and DIVERGED in raw
    healing = (out / "healing.md").read_text()
    assert DIVERGED in healing and "nan" not in healing.lower()


def test_the_suite_wide_nan_scan_finds_nan_literals(tmp_path):
    from conftest import nan_literals

    (tmp_path / "ok.json").write_text('{"loss": null, "note": "diverged", "name": "nano", "words": ["nan", "inf"]}')
    (tmp_path / "tokenizer.json").write_text('{"x": NaN}')  # transformers' files are not our results
    (tmp_path / "bad.json").write_text('{"loss": NaN}')
    (tmp_path / "bad.md").write_text("| 8 | fisher | nan |")
    found = nan_literals(tmp_path)
    assert len(found) == 2 and any("bad.json" in f for f in found) and any("bad.md" in f for f in found)
    for bad in ("bad.json", "bad.md"):
        (tmp_path / bad).unlink()


def _tiny_family(path, model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from cboprune.models.loading import resolve_model_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source("default")[0])
    kw = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, sliding_window=8,
              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id)
    extra = {"gemma2": dict(head_dim=16), "qwen2": dict(use_sliding_window=True, max_window_layers=2),
             "qwen3": dict(head_dim=16, use_sliding_window=True, max_window_layers=2), "mistral": {}}[model_type]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kw, **extra)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["gemma2", "qwen2"])  # qwen3 and mistral checked once too (finite)
def test_other_families_with_sliding_layers_evaluate_finite_after_a_heal(model_type, shared_data, tmp_path):
    """The other families whose configs carry sliding-window layers: a pruned, healed checkpoint's
    held-out NLL on right-padded batches (samples shorter than the window and longer) is finite."""
    from cboprune.data.calibration import load_calibration
    from cboprune.heal import HealConfig, heal
    from cboprune.models.masked import calibration_nll
    from cboprune.models import load_model
    from cboprune.models.surgery import remove_blocks, save_pruned

    teacher = _tiny_family(tmp_path / "teacher", model_type)
    loaded = load_model(str(teacher), dtype="float32")
    save_pruned(remove_blocks(loaded.model, [1]), loaded.tokenizer, tmp_path / "student", {"removed": [1]})
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    heal(HealConfig(student=str(tmp_path / "student"), teacher=str(teacher), data=data,
                    output_dir=str(tmp_path / "healed"), seq_len=32, micro_batch_size=2, global_batch_size=2,
                    max_steps=1, learning_rate=1e-3, max_samples=4, heldout_samples=2), progress=False)
    healed = load_model(str(tmp_path / "healed"), dtype="float32")
    samples = load_calibration(data, healed.tokenizer, n_samples=6, seq_len=160)
    lengths = samples.attention_mask.sum(dim=1)
    assert int(lengths.min()) < 160 and int(lengths.max()) > 8  # padded rows, and rows past the window
    assert math.isfinite(calibration_nll(healed.model, samples, batch_size=3))
