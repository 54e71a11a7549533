"""Healing options: the memory-lean loss trains like the plain formula, the curve and held-out
evaluations land in healing.json, checkpoints keep the student's dtype, switches refuse cleanly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cboprune.core.errors import CBOPruneError
from cboprune.heal import HEALING_FILE, HealConfig, heal
from cboprune.models.surgery import remove_blocks, save_pruned

from conftest import save_tiny_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal-training")
    teacher = save_tiny_checkpoint(root / "teacher", n_layers=3)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    save_pruned(remove_blocks(AutoModelForCausalLM.from_pretrained(teacher), [1]), tokenizer, root / "student",
                {"removed": [1]})
    bf16 = remove_blocks(AutoModelForCausalLM.from_pretrained(teacher), [1]).to(torch.bfloat16)
    save_pruned(bf16, tokenizer, root / "student-bf16", {"removed": [1]})
    return teacher, root


def _cfg(pair, shared_data, out, student="student", **kw):
    base = dict(student=str(pair[1] / student), teacher=str(pair[0]),
                data=str(shared_data / "calib" / "alpaca_en_demo.json"), output_dir=str(out), seq_len=32,
                micro_batch_size=2, global_batch_size=4, max_steps=3, learning_rate=3e-3, warmup_ratio=0.0,
                max_samples=12, heldout_samples=4, kd_weight=0.8)
    base.update(kw)
    return HealConfig(**base)


@pytest.mark.slow
def test_memory_lean_loss_trains_like_the_plain_formula(pair, shared_data, tmp_path):
    lean = heal(_cfg(pair, shared_data, tmp_path / "lean", loss_chunk_tokens=7, eval_every=2), progress=False)
    assert lean["distillation_loss"] == "lm-head-in-loss"
    plain = heal(_cfg(pair, shared_data, tmp_path / "plain", loss_chunk_tokens=0), progress=False)
    assert plain["distillation_loss"] == "plain"
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "lean").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    for x, y in zip(lean["curve"]["train"], plain["curve"]["train"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["lr"] == y["lr"]
    written = json.loads((tmp_path / "lean" / HEALING_FILE).read_text())
    assert [p["step"] for p in written["curve"]["train"]] == [1, 2, 3]
    assert [p["step"] for p in written["curve"]["heldout"]] == [2, 3]
    assert written["curve"]["heldout"][-1]["loss"] == pytest.approx(written["heldout_loss_after"]["student"])
    assert (tmp_path / "lean" / "healing_curve.png").stat().st_size > 1000


@pytest.mark.slow
def test_checkpoint_keeps_the_students_dtype_unless_told(pair, shared_data, tmp_path):
    heal(_cfg(pair, shared_data, tmp_path / "auto", student="student-bf16", max_steps=1), progress=False)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "auto", dtype="auto").dtype == torch.bfloat16
    heal(_cfg(pair, shared_data, tmp_path / "f32", student="student-bf16", max_steps=1, save_dtype="float32",
              mixed_precision="bf16"), progress=False)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype="auto").dtype == torch.float32


@pytest.mark.parametrize("bad, match", [
    ({"teacher_4bit": True}, "CUDA"),
    ({"report_to": "wandb"}, "needs the wandb package|wandb"),
    ({"save_dtype": "int8"}, "--save-dtype must be one of"),
    ({"eval_every": 0}, "--eval-every must be a positive integer"),
    ({"teacher_cache": "x", "kd_weight": 0.0}, "teacher_cache"),
])
def test_bad_switches_are_one_line(pair, shared_data, tmp_path, bad, match):
    if bad.get("report_to") == "wandb":
        pytest.importorskip("accelerate")
        from accelerate.utils import is_wandb_available

        if is_wandb_available():
            pytest.skip("wandb is installed here")
    if bad.get("teacher_4bit") and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(CBOPruneError, match=match) as e:
        heal(_cfg(pair, shared_data, tmp_path / "x", **bad), progress=False)
    assert "\n" not in str(e.value)


def test_teacher_4bit_switch_on_the_command_line():
    import argparse

    from cboprune.heal.recipe import HealConfig
    from cboprune.core.options import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p, HealConfig)
    common = ["s", "--data", "d", "--output-dir", "o"]
    assert p.parse_args(common).teacher_4bit is None
    assert p.parse_args(common + ["--no-teacher-4bit"]).teacher_4bit is False
    assert p.parse_args(common + ["--teacher-4bit"]).teacher_4bit is True


def test_report_to_tensorboard_writes_the_curve(pair, shared_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    heal(_cfg(pair, shared_data, tmp_path / "tb", report_to="tensorboard", eval_every=1, max_steps=2),
         progress=False)
    runs = tmp_path / "tb.runs"
    events = sorted(runs.rglob("events.out.tfevents.*"))
    assert events, f"no event file under {runs}"
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [e.step for e in acc.Scalars(tag)]
    assert scalars["train/loss"] == [1, 2] and scalars["heldout/loss"] == [1, 2]
