"""Healing on tiny models: the loss goes down, kill-and-resume is exact, LoRA merges into a plain checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from cboprune.core.errors import CBOPruneError
from cboprune.heal import HEALING_FILE, DistillationLoss, HealConfig, heal
from cboprune.models.surgery import REMOVAL_FILE, remove_blocks, save_pruned

from conftest import save_tiny_checkpoint


@pytest.fixture(scope="module")
def teacher_and_student(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("heal")
    teacher = save_tiny_checkpoint(root / "teacher", n_layers=4)
    student = remove_blocks(AutoModelForCausalLM.from_pretrained(teacher), [1, 2])
    save_pruned(student, AutoTokenizer.from_pretrained(teacher), root / "student", {"removed": [1, 2], "energy": 0.5})
    return teacher, root / "student"


def _cfg(pair, shared_data, out, **kw):
    teacher, student = pair
    base = dict(student=str(student), teacher=str(teacher), data=str(shared_data / "calib" / "alpaca_en_demo.json"),
                output_dir=str(out), seq_len=40, micro_batch_size=2, global_batch_size=4, max_steps=6,
                learning_rate=3e-3, warmup_ratio=0.0, save_every=2, max_samples=16, heldout_samples=6)
    base.update(kw)
    return HealConfig(**base)


@pytest.mark.slow
def test_distillation_lowers_heldout_loss(teacher_and_student, shared_data, tmp_path):
    # The tiny teacher is random, so data cross-entropy only falls with some CE in the mix.
    report = heal(_cfg(teacher_and_student, shared_data, tmp_path / "healed", kd_weight=0.5), progress=False)
    before, after = report["heldout_loss_before"], report["heldout_loss_after"]
    assert after["student"] < before["student"]
    assert report["train_loss_first_last"][1] < report["train_loss_first_last"][0]
    healed = tmp_path / "healed"
    assert json.loads((healed / REMOVAL_FILE).read_text())["removed"] == [1, 2]
    assert json.loads((healed / HEALING_FILE).read_text())["heldout_loss_after"]["student"] == after["student"]
    assert AutoModelForCausalLM.from_pretrained(healed).config.num_hidden_layers == 2
    assert not (tmp_path / "healed.heal-state").exists()


@pytest.mark.slow
def test_kill_and_resume_gives_the_same_weights(teacher_and_student, shared_data, tmp_path):
    heal(_cfg(teacher_and_student, shared_data, tmp_path / "straight"), progress=False)
    stopped = heal(_cfg(teacher_and_student, shared_data, tmp_path / "resumed", stop_after_steps=3), progress=False)
    assert stopped == {"stopped_at_step": 3}
    assert (tmp_path / "resumed.heal-state" / "latest").is_dir()  # last checkpoint: step 2
    with pytest.raises(CBOPruneError, match="--resume"):
        heal(_cfg(teacher_and_student, shared_data, tmp_path / "resumed"), progress=False)
    heal(_cfg(teacher_and_student, shared_data, tmp_path / "resumed", resume=True), progress=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_lora_merges_into_a_plain_checkpoint(teacher_and_student, shared_data, tmp_path):
    report = heal(_cfg(teacher_and_student, shared_data, tmp_path / "lora", lora=True, lora_rank=4,
                       learning_rate=1e-2), progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora")
    assert not any("lora" in n for n, _ in model.named_parameters())
    student = AutoModelForCausalLM.from_pretrained(teacher_and_student[1])
    changed = [n for n, p in model.state_dict().items() if not torch.equal(p, student.state_dict()[n])]
    assert changed and all("proj" in n for n in changed)  # only LoRA-targeted linears moved
    assert report["heldout_loss_after"]["kl_to_teacher"] < report["heldout_loss_before"]["kl_to_teacher"]


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.ones_like(ids)
    loss = DistillationLoss(temperature=2.0)
    assert loss(logits, logits, ids, mask).abs() < 1e-6
    assert loss(logits, logits + torch.randn_like(logits), ids, mask) > 1e-3
    ce_only = DistillationLoss(kd_weight=0.0)(logits, None, ids, mask)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert torch.allclose(ce_only, expected, atol=1e-6)


@pytest.mark.slow
def test_heal_command_line(teacher_and_student, shared_data, tmp_path, capsys):
    from cboprune.cli import main

    teacher, student = teacher_and_student
    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    assert main(["heal", str(student), "--data", data, "--output-dir", str(tmp_path / "h")]) == 2
    assert "pass --teacher" in capsys.readouterr().err  # the tiny student's removal.json names no source
    assert main(["-q", "heal", str(student), "--teacher", str(teacher), "--data", data, "--output-dir",
                 str(tmp_path / "h"), "--steps", "2", "--seq-len", "32", "--max-samples", "8",
                 "--micro-batch-size", "2", "--global-batch-size", "2"]) == 0
    assert "healed checkpoint:" in capsys.readouterr().out
    assert (tmp_path / "h" / HEALING_FILE).is_file()


def test_time_budget_stops_early_and_still_saves(teacher_and_student, shared_data, tmp_path):
    report = heal(_cfg(teacher_and_student, shared_data, tmp_path / "budget", max_minutes=0.0), progress=False)
    assert report["stopped_by_time_budget"] and report["steps"] == 0 and report["planned_steps"] == 6
    assert (tmp_path / "budget" / HEALING_FILE).is_file()


def test_save_every_zero_writes_no_training_state(teacher_and_student, shared_data, tmp_path, monkeypatch):
    """A study's heal is rerun, never resumed: `save_every=0` skips the state (weights and optimizer)."""
    def no_state(*args, **kwargs):
        raise AssertionError("a training state was written with save_every=0")

    monkeypatch.setattr("cboprune.heal.trainer.save_state", no_state)
    report = heal(_cfg(teacher_and_student, shared_data, tmp_path / "h", save_every=0, max_steps=2), progress=False)
    assert report["steps"] == 2 and (tmp_path / "h" / HEALING_FILE).is_file()


@pytest.mark.slow
def test_8bit_optimizer_state_is_saved_and_resumed_exactly(teacher_and_student, shared_data, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    kw = dict(optimizer="adamw8bit", max_steps=4)
    heal(_cfg(teacher_and_student, shared_data, tmp_path / "straight", **kw), progress=False)
    heal(_cfg(teacher_and_student, shared_data, tmp_path / "resumed", stop_after_steps=3, **kw), progress=False)
    saved = load_file(tmp_path / "resumed.heal-state" / "latest" / "optimizer.safetensors")
    quantized = [k for k, v in saved.items() if v.dtype == torch.uint8 and k != "rng.cpu"]
    assert quantized and all("__bnb_optimizer_quant_state__" in k for k in quantized)  # 8-bit moments, nested
    heal(_cfg(teacher_and_student, shared_data, tmp_path / "resumed", resume=True, **kw), progress=False)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_8bit_optimizer_without_bitsandbytes_is_one_line(teacher_and_student, shared_data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(CBOPruneError, match="needs bitsandbytes"):
        heal(_cfg(teacher_and_student, shared_data, tmp_path / "x", optimizer="adamw8bit"), progress=False)
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_judge_evaluation_measures_only_the_ce_after_and_counts_its_tokens(teacher_and_student, shared_data,
                                                                          tmp_path):
    full = heal(_cfg(teacher_and_student, shared_data, tmp_path / "full", max_steps=2), progress=False)
    lean = heal(_cfg(teacher_and_student, shared_data, tmp_path / "lean", max_steps=2, heldout_eval="after-ce"),
                progress=False)
    assert lean["heldout_loss_before"] == {} and set(lean["heldout_loss_after"]) == {"student"}
    assert lean["heldout_loss_after"]["student"] == pytest.approx(full["heldout_loss_after"]["student"], abs=1e-6)
    positions = lean["token_positions"]
    # 2 steps x 4 samples, each micro-batch cut to its longest sample (<= seq_len 40)
    assert 2 * 4 * 8 <= positions["train"] <= 2 * 4 * 40 and positions == full["token_positions"]
    assert 6 * 8 <= positions["heldout"] <= 6 * 40


def test_distillation_data_is_tokenized_once_per_file_tokenizer_and_settings(teacher_and_student, tmp_path,
                                                                             monkeypatch):
    """A study heals many students on one file: the second heal reuses the tokenized sets; another
    file content, tokenizer or length tokenizes again."""
    from transformers import AutoTokenizer

    import cboprune.heal.data as data

    teacher, student = teacher_and_student
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"record {i} " + "words and more words " * 6}) + "\n"
                            for i in range(20)))
    first = data.load_distillation_data(path, AutoTokenizer.from_pretrained(teacher), seq_len=32)
    calls = []
    real = data._tokenize
    monkeypatch.setattr(data, "_tokenize", lambda *a: calls.append(1) or real(*a))
    again = data.load_distillation_data(path, AutoTokenizer.from_pretrained(student), seq_len=32)  # same tokenizer
    assert not calls and torch.equal(again[0].input_ids, first[0].input_ids)
    data.load_distillation_data(path, AutoTokenizer.from_pretrained(student), seq_len=24)
    assert calls
    calls.clear()
    other = AutoTokenizer.from_pretrained(student)
    other.add_tokens(["<new-token>"])
    data.load_distillation_data(path, other, seq_len=24)
    assert calls
    calls.clear()
    path.write_text("".join(json.dumps({"text": "other text " * 8}) + "\n" for _ in range(20)))
    changed = data.load_distillation_data(path, other, seq_len=24)
    assert calls and not torch.equal(changed[0].input_ids[:, :4], first[0].input_ids[:, :4])
