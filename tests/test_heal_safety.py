"""Healing refuses bad state and bad output paths with one line, never unpickles, never leaves half an output."""

from __future__ import annotations

import json
import os
import pickle
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cboprune.core.errors import CBOPruneError
from cboprune.heal import HEALING_FILE, HealConfig, heal
from cboprune.heal import trainer as trainer_module
from cboprune.models.surgery import remove_blocks, save_pruned

from conftest import save_tiny_checkpoint


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal-safety")
    teacher = save_tiny_checkpoint(root / "teacher", n_layers=3)
    student = remove_blocks(AutoModelForCausalLM.from_pretrained(teacher), [1])
    save_pruned(student, AutoTokenizer.from_pretrained(teacher), root / "student", {"removed": [1]})
    return teacher, root / "student"


def _cfg(pair, shared_data, out, **kw):
    base = dict(student=str(pair[1]), teacher=str(pair[0]), data=str(shared_data / "calib" / "alpaca_en_demo.json"),
                output_dir=str(out), seq_len=32, micro_batch_size=2, global_batch_size=2, max_steps=4,
                learning_rate=3e-3, warmup_ratio=0.0, save_every=2, max_samples=8, heldout_samples=2)
    base.update(kw)
    return HealConfig(**base)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and message
    return message


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def interrupted(pair, shared_data, tmp_path):
    """An output path whose run stopped (as if killed) after step 3: state at step 2 beside it."""
    out = tmp_path / "healed"
    assert heal(_cfg(pair, shared_data, out, stop_after_steps=3), progress=False) == {"stopped_at_step": 3}
    latest = tmp_path / "healed.heal-state" / "latest"
    assert sorted(p.name for p in latest.iterdir()) == ["optimizer.safetensors", "state.json",
                                                        "trainable.safetensors"]
    return out, latest


def test_crafted_pickle_in_the_state_is_refused_and_never_run(pair, shared_data, tmp_path, interrupted):
    out, latest = interrupted
    marker = tmp_path / "pwned"
    (latest / "training.pt").write_bytes(pickle.dumps({"optimizer": _Exploit(marker)}))
    with pytest.raises(CBOPruneError) as e:
        heal(_cfg(pair, shared_data, out, resume=True), progress=False)
    assert "pickle" in _one_line(e)
    (latest / "training.pt").unlink()
    (latest / "optimizer.safetensors").write_bytes(pickle.dumps(_Exploit(marker)))  # same name, pickle inside
    with pytest.raises(CBOPruneError) as e:
        heal(_cfg(pair, shared_data, out, resume=True), progress=False)
    assert "not a readable safetensors" in _one_line(e)
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("damage", ["state-json", "missing-file", "state-is-file", "stray-files", "other-options"])
def test_malformed_resume_state_is_one_line(pair, shared_data, tmp_path, interrupted, damage, monkeypatch):
    out, latest = interrupted
    kw = {}
    if damage == "state-json":
        (latest / "state.json").write_text("{not json")
    elif damage == "missing-file":
        (latest / "trainable.safetensors").unlink()
    elif damage == "state-is-file":
        root = latest.parent
        import shutil

        shutil.rmtree(root)
        root.write_text("x")
    elif damage == "stray-files":
        import shutil

        shutil.rmtree(latest)
        (latest.parent / "junk.bin").write_text("x")
    else:
        kw = {"learning_rate": 1e-3}
    monkeypatch.setattr("cboprune.models.load_model", _no_model_load)  # refused before any model loads
    with pytest.raises(CBOPruneError) as e:
        heal(_cfg(pair, shared_data, out, resume=True, **kw), progress=False)
    assert "heal state" in _one_line(e)


@pytest.mark.parametrize("damage", ["wrong-shape", "missing-tensor"])
def test_state_of_another_model_is_one_line(pair, shared_data, tmp_path, interrupted, damage):
    from safetensors.torch import load_file, save_file

    out, latest = interrupted
    weights = load_file(latest / "trainable.safetensors")
    name = sorted(weights)[0]
    if damage == "wrong-shape":
        weights[name] = torch.zeros(3, 5)
    else:
        del weights[name]
    save_file(weights, latest / "trainable.safetensors")
    with pytest.raises(CBOPruneError) as e:
        heal(_cfg(pair, shared_data, out, resume=True), progress=False)
    assert "does not match this model" in _one_line(e) and name in _one_line(e)
    assert not out.exists()


def _no_model_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the input was refused")


@pytest.mark.parametrize("case", ["dot", "file", "non-empty", "read-only", "holds-student", "under-a-file"])
def test_bad_output_paths_are_refused_before_any_work(pair, shared_data, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    out = {"dot": ".", "file": "afile", "non-empty": "full", "read-only": "/proc/cboprune-heal-test",
           "holds-student": str(pair[1].parent), "under-a-file": "afile/sub"}[case]
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    monkeypatch.setattr("cboprune.models.load_model", _no_model_load)
    with pytest.raises(CBOPruneError) as e:
        heal(_cfg(pair, shared_data, out, overwrite=case in ("dot", "holds-student")), progress=False)
    _one_line(e)
    assert (tmp_path / "full" / "keep.txt").read_text() == "x" and (tmp_path / "afile").read_text() == "x"


def test_interrupted_save_leaves_no_output_and_the_rerun_cleans_the_staging(pair, shared_data, tmp_path,
                                                                             monkeypatch):
    out = tmp_path / "healed"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "plot_curve", killed)  # dies in the middle of writing the output
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        heal(_cfg(pair, shared_data, out), progress=False)
    assert not any("requires_grad=True to a scalar" in str(w.message) for w in caught)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".healed.")]
    monkeypatch.undo()
    report = heal(_cfg(pair, shared_data, out, resume=True), progress=False)
    assert report["steps"] == 4 and json.loads((out / HEALING_FILE).read_text())["steps"] == 4
    assert (out / "healing_curve.png").is_file() and len(report["curve"]["train"]) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]


def test_bad_output_is_one_line_on_the_command_line(pair, shared_data, tmp_path, capsys):
    from cboprune.cli import main

    (tmp_path / "afile").write_text("x")
    code = main(["heal", str(pair[1]), "--teacher", str(pair[0]), "--data",
                 str(shared_data / "calib" / "alpaca_en_demo.json"), "--output-dir", str(tmp_path / "afile")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cboprune: error:") and "is a file" in err[0]


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_real_signal_mid_run_leaves_state_or_nothing_and_resume_completes(pair, shared_data, tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out = tmp_path / "healed"
    cmd = [sys.executable, "-m", "cboprune.cli", "-q", "heal", str(pair[1]), "--teacher", str(pair[0]), "--data",
           str(shared_data / "calib" / "alpaca_en_demo.json"), "--output-dir", str(out), "--steps", "400",
           "--seq-len", "32", "--max-samples", "8", "--micro-batch-size", "2", "--global-batch-size", "2",
           "--save-every", "1", "--heldout-fraction", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = tmp_path / "healed.heal-state" / "latest" / "state.json"
    deadline = time.time() + 240
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
    time.sleep(1.0)  # somewhere in the middle of training or a state save
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (130 if sig == "SIGINT" else -signal.SIGKILL) and "Traceback" not in err.decode()
    assert not out.exists()  # never a half-written output
    # Resume and stop at once by the time budget: the output holds the resumed step's weights.
    resumed = subprocess.run(cmd + ["--resume", "--max-minutes", "0"], env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert json.loads((out / HEALING_FILE).read_text())["steps"] >= 1
    assert not (tmp_path / "healed.heal-state").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["healed"]


@pytest.mark.parametrize("content", [None, b"\xff\xfe\x00binary", b"[]"])
def test_bad_data_is_refused_before_any_model_loads(pair, shared_data, tmp_path, monkeypatch, content):
    data = tmp_path / "data.json"
    if content is not None:
        data.write_bytes(content)
    monkeypatch.setattr("cboprune.models.load_model", _no_model_load)
    with pytest.raises(CBOPruneError) as e:
        heal(_cfg(pair, shared_data, tmp_path / "out", data=str(data)), progress=False)
    _one_line(e)


def test_a_heal_longer_than_the_context_is_refused_before_any_model_loads(pair, shared_data, tmp_path):
    from cboprune.heal import heal

    with pytest.raises(CBOPruneError, match="--seq-len 4096 exceeds the model's context of 128") as info:
        heal(_cfg(pair, shared_data, tmp_path / "out", seq_len=4096), progress=False)
    _one_line(info)
    assert not (tmp_path / "out").exists()

