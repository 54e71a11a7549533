"""Calibration data from files: chat records rendered with the template, text packed, bad input refused."""

from __future__ import annotations

import json

import pytest

from cboprune.data.calibration import builtin_prompts, load_calibration
from cboprune.core.errors import CBOPruneError


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from cboprune.models.loading import resolve_model_source

    return AutoTokenizer.from_pretrained(resolve_model_source("default")[0])


def test_instruction_records_use_the_chat_template(tokenizer, shared_data):
    cal = load_calibration(str(shared_data / "calib" / "alpaca_en_demo.json"), tokenizer, n_samples=8, seq_len=64)
    assert cal.input_ids.shape == (8, 64)
    text = tokenizer.decode(cal.input_ids[0][cal.attention_mask[0].bool()])
    assert text.startswith("<|im_start|>") and "<|im_start|>assistant" in text
    # right padding only: the mask is a prefix of ones
    lengths = cal.attention_mask.sum(1)
    for row, n in zip(cal.attention_mask, lengths):
        assert row[:n].all() and not row[n:].any()


@pytest.mark.parametrize("name", ["c4_demo.jsonl", "wiki_demo.txt"])
def test_plain_text_is_packed_into_full_windows(tokenizer, shared_data, name):
    cal = load_calibration(str(shared_data / "calib" / name), tokenizer, n_samples=6, seq_len=96)
    assert cal.input_ids.shape == (6, 96)
    assert cal.attention_mask.all()
    assert cal.info["kind"] == "packed text"


def test_same_seed_same_samples_other_seed_other_samples(tokenizer, shared_data):
    path = str(shared_data / "calib" / "alpaca_en_demo.json")
    a = load_calibration(path, tokenizer, n_samples=4, seq_len=64, seed=0)
    b = load_calibration(path, tokenizer, n_samples=4, seq_len=64, seed=0)
    c = load_calibration(path, tokenizer, n_samples=4, seq_len=64, seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_messages_and_sharegpt_records(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    records = [{"messages": [{"role": "user", "content": "Name three colours of the rainbow please."},
                             {"role": "assistant", "content": "Red, orange and yellow are three of them."}]},
               {"conversations": [{"from": "human", "value": "What is the boiling point of water at sea level?"},
                                  {"from": "gpt", "value": "It is one hundred degrees Celsius."}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cal = load_calibration(str(path), tokenizer, n_samples=8, seq_len=64)
    assert cal.n_samples == 2


@pytest.mark.parametrize("content,suffix,fragment", [
    ("", ".jsonl", "empty or too short"),
    ("short text", ".txt", "empty or too short"),
    ('{"foo": 1}\n', ".jsonl", "record 0 is malformed"),
    ('{"text": "a"\n', ".jsonl", "is not valid JSON"),
    # a number or null where text belongs: one line, not a TypeError from inside the chat template
    ('{"instruction": 5, "output": null}\n', ".jsonl", "record 0 is malformed .message content 5"),
    ('{"messages": [{"role": "user", "content": ["x"]}]}\n', ".jsonl", "is not a string"),
    ('{"text": 7}\n', ".jsonl", "text 7 is not a string"),
    ("a,b\n", ".csv", "unsupported calibration file type"),
])
def test_bad_files_give_one_line_errors(tokenizer, tmp_path, content, suffix, fragment):
    path = tmp_path / f"data{suffix}"
    path.write_text(content)
    with pytest.raises(CBOPruneError, match=fragment) as info:
        load_calibration(str(path), tokenizer, n_samples=4, seq_len=64)
    assert "\n" not in str(info.value)


def test_missing_file(tokenizer, tmp_path):
    with pytest.raises(CBOPruneError, match="not found"):
        load_calibration(str(tmp_path / "nope.jsonl"), tokenizer)


def test_builtin_prompts_are_many_and_diverse():
    prompts = builtin_prompts()
    assert len(prompts) >= 64
    assert {"code", "math", "science", "chat", "reasoning"} <= {p["category"] for p in prompts}
    assert len({p["prompt"] for p in prompts}) == len(prompts)
