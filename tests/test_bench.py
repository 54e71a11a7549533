"""cboprune bench: sizes, alternated timing, ratios, the report and its one-line errors (tiny models)."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from cboprune.bench.measure import (BenchSettings, bench_models, disk_bytes, markdown_report, measure_speedup, model_stats,
                            time_generation)
from cboprune.bench.cli import BenchOptions, run_bench_command
from cboprune.core.options import add_arguments
from cboprune.core.errors import CBOPruneError
from cboprune.models.surgery import remove_blocks
from conftest import tiny_llama

FAST = BenchSettings(batch_sizes=(1, 2), lengths=(8,), new_tokens=3, repeats=2, warmup=1)


def _pair(n_remove: int = 4):
    original = tiny_llama(n_layers=8)
    pruned = remove_blocks(copy.deepcopy(original), list(range(1, 1 + n_remove)))
    return original, pruned


def test_model_stats_count_blocks_and_the_parts_pruning_keeps():
    original, pruned = _pair()
    a, b = model_stats(original), model_stats(pruned)
    per_block = sum(p.numel() for p in original.model.layers[0].parameters())
    assert a["blocks"] == 8 and b["blocks"] == 4
    assert a["params"] - b["params"] == 4 * per_block
    assert a["params_embedding_and_head"] == b["params_embedding_and_head"] == 2 * 128 * 32
    assert a["weight_bytes"] >= 4 * a["params"] and a["dtype"] == "float32"


def test_bench_alternates_models_and_reports_paired_ratios(monkeypatch):
    original, pruned = _pair()
    calls = []
    real = time_generation

    def spy(model, ids, new_tokens):
        calls.append((model is original, tuple(ids.shape)))
        return real(model, ids, new_tokens)

    monkeypatch.setattr("cboprune.bench.measure.time_generation", spy)
    report = bench_models({"orig": original, "pruned": pruned}, FAST)
    timed = calls[: (FAST.warmup + FAST.repeats) * 2 * 2]
    # every shape runs both models back to back, and the order flips each repetition
    assert [c[0] for c in timed[:4]] == [True, False, True, False]
    assert [c[0] for c in timed[4:8]] == [False, True, False, True]
    rows = {(r["model"], r["batch_size"]): r for r in report["runs"]}
    assert len(report["runs"]) == 4 and rows[("pruned", 2)]["prefill_s"]["n"] == FAST.repeats
    r = rows[("pruned", 2)]
    # tokens/s per repetition: its median lies within the range the per-repetition times allow
    # (a ratio of medians would be a timing-dependent test on a loaded machine)
    tps = r["prefill_tokens_per_s"]["median"]
    assert 2 * 8 / r["prefill_s"]["max"] * 0.999 <= tps <= 2 * 8 / r["prefill_s"]["min"] * 1.001
    assert r["decode_speedup"]["min"] <= r["decode_speedup"]["median"] <= r["decode_speedup"]["max"]
    assert "prefill_speedup" not in rows[("orig", 1)]
    # KV cache: 2 (K, V) x layers x B x (L + steps) x kv heads x head dim x 4 bytes, measured on the cache
    for (model, b), r in rows.items():
        layers = 8 if model == "orig" else 4
        assert r["kv_cache_bytes"] == 2 * layers * b * (8 + 3) * 2 * 8 * 4
        assert r["peak_above_weights_bytes"] is None  # CPU: not guessed
    assert report["models"]["pruned"]["params_removed"] > 0
    md = markdown_report(report)
    assert "| pruned | 2 | 8 |" in md and "decode speed-up" in md
    json.dumps(report)  # JSON-able


def test_time_generation_runs_with_the_cache_of_a_pruned_model():
    _, pruned = _pair(n_remove=3)
    prefill, decode = time_generation(pruned, torch.randint(0, 128, (2, 6)), 4)
    assert prefill > 0 and decode > 0


def test_measure_speedup_on_a_much_smaller_model_is_above_one():
    original = tiny_llama(n_layers=24)
    pruned = remove_blocks(copy.deepcopy(original), list(range(2, 22)))
    out = measure_speedup(original, pruned, lengths=(16,), new_tokens=8, repeats=3)
    assert out["params_removed"] == out["params_original"] - out["params_pruned"] > 0
    assert out["decode_speedup"] > 1.5  # 4 blocks left of 24: decode is dominated by the blocks


def test_disk_bytes_counts_weight_files(tmp_path):
    original, _ = _pair()
    original.save_pretrained(tmp_path)
    size = disk_bytes(tmp_path)
    assert size == (tmp_path / "model.safetensors").stat().st_size and disk_bytes(None) is None


def _args(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser, BenchOptions)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("argv, match", [
    (["/nope/a"], "at least one pruned"),
    (["/nope/a", "/nope/b", "--batch-sizes", "0"], "--batch-sizes must be positive"),
    (["/nope/a", "/nope/b", "--new-tokens", "0"], "--new-tokens must be a positive integer"),
    (["/nope/a", "/nope/b", "--repeats", "0"], "--repeats must be a positive integer"),
    (["/nope/a", "/nope/b", "--device", "tpu"], "use cpu, cuda"),
    (["/nope/a", "/nope/b", "--threads", "0"], "--threads must be a positive integer"),
    (["/nope/a", "/nope/b", "--dtype", "int3"], "unknown dtype"),
    (["/nope/a", "/nope/b", "--output", "."], "is a directory"),
])
def test_bench_bad_inputs_fail_in_one_line_before_loading(argv, match):
    with pytest.raises(CBOPruneError, match=match) as exc:
        run_bench_command(_args(*argv))
    assert "\n" not in str(exc.value)


def test_bench_command_on_checkpoints_writes_json_and_markdown(tmp_path, capsys):
    from conftest import save_tiny_checkpoint

    orig = save_tiny_checkpoint(tmp_path / "orig", n_layers=4)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(orig)
    remove_blocks(model, [1, 2])
    model.save_pretrained(tmp_path / "pruned")
    (tmp_path / "pruned" / "tokenizer.json").write_bytes((orig / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json",):
        (tmp_path / "pruned" / name).write_bytes((orig / name).read_bytes())
    assert run_bench_command(_args(str(orig), str(tmp_path / "pruned"), "--batch-sizes", "1", "--lengths", "8",
                                   "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                                   "-o", str(tmp_path / "bench"))) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["models"][str(tmp_path / "pruned")]["blocks"] == 2
    assert report["models"][str(orig)]["disk_bytes"] > report["models"][str(tmp_path / "pruned")]["disk_bytes"]
    assert "prefill tok/s" in (tmp_path / "bench.md").read_text() and "prefill tok/s" in capsys.readouterr().out
