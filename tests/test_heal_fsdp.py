"""Sharded healing (FSDP2) with 2 CPU processes (gloo): the run completes, kill + resume gives the same
weights as the uninterrupted sharded run, and both equal one unsharded process to float tolerance.
The accelerate launcher's FSDP switch (ACCELERATE_USE_FSDP) turns the same path on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cboprune.core.errors import CBOPruneError
from cboprune.heal import HealConfig, heal
from cboprune.models.surgery import remove_blocks, save_pruned

from conftest import save_tiny_checkpoint

WORKER = """
import json, os, sys
import torch
torch.set_num_threads(1)
import cboprune.core.outputs as outputs
from cboprune.heal import HealConfig, heal

# Every staging entry, writability probe and removal of the one writer, logged per rank: only the
# main process may touch the output's staging area.
audit = open(os.path.join(os.path.dirname(sys.argv[0]), f"writes-rank{os.environ['RANK']}.txt"), "a")
def logged(name, fn):
    def wrapper(*args, **kwargs):
        audit.write(f"{name} {args[0]}\\n"); audit.flush()
        return fn(*args, **kwargs)
    return wrapper
for name in ("_sibling", "_writable", "_remove"):
    setattr(outputs, name, logged(name, getattr(outputs, name)))
kw = json.loads(sys.argv[1])
print(json.dumps(heal(HealConfig(**kw), progress=False).get("stopped_at_step")))
"""


@pytest.fixture(scope="module")
def tied_pair(tmp_path_factory):
    """A tiny teacher with tied input/output embeddings (like the default model) and its pruned student."""
    root = tmp_path_factory.mktemp("fsdp")
    teacher = save_tiny_checkpoint(root / "teacher", n_layers=4)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(teacher)
    student = remove_blocks(AutoModelForCausalLM.from_pretrained(teacher), [1])
    save_pruned(student, AutoTokenizer.from_pretrained(teacher), root / "student", {"removed": [1]})
    return teacher, root / "student"


def _kw(pair, shared_data, out, **extra):
    teacher, student = pair
    kw = dict(student=str(student), teacher=str(teacher), data=str(shared_data / "calib" / "alpaca_en_demo.json"),
              output_dir=str(out), seq_len=32, micro_batch_size=2, global_batch_size=4, max_steps=5,
              learning_rate=3e-3, warmup_ratio=0.0, save_every=2, max_samples=16, heldout_samples=4, seed=0,
              max_grad_norm=0.05)  # small enough that every step clips: the sharded global norm is tested too
    kw.update(extra)
    return kw


def _torchrun(kw: dict, tmp_path: Path, env_extra: dict | None = None) -> str:
    tests = Path(__file__).resolve().parent
    script = tmp_path / "heal_worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tests.parent), **(env_extra or {}))
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), json.dumps(kw)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run.stdout


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.slow
def test_two_process_fsdp_heal_resumes_exactly_and_matches_one_process(tied_pair, shared_data, tmp_path):
    _torchrun(_kw(tied_pair, shared_data, tmp_path / "straight", fsdp=True), tmp_path)
    # Stopped after step 3 (as if killed; the last checkpoint is step 2), then resumed, launched the
    # way `accelerate launch --config_file fsdp.yaml` does (its environment switch, no --fsdp).
    out = _torchrun(_kw(tied_pair, shared_data, tmp_path / "resumed", fsdp=True, stop_after_steps=3), tmp_path)
    # Both ranks print the step; their lines can interleave ("33\n\n"), so compare the digits only.
    assert out.split() and set("".join(out.split())) == {"3"}, out
    assert (tmp_path / "resumed.heal-state" / "latest").is_dir()
    _torchrun(_kw(tied_pair, shared_data, tmp_path / "resumed", resume=True), tmp_path,
              {"ACCELERATE_USE_FSDP": "true"})
    straight, resumed = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    # only the main process checked, staged and wrote (checkpoint, heal state); the other rank waited
    assert (tmp_path / "writes-rank1.txt").read_text() == ""
    assert "straight" in (tmp_path / "writes-rank0.txt").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    report = json.loads((tmp_path / "straight" / "healing.json").read_text())
    assert report["processes"] == 2 and report["config"]["fsdp"] and report["sharding"] == "fsdp2" and report["steps"] == 5

    heal(HealConfig(**_kw(tied_pair, shared_data, tmp_path / "single")), progress=False)
    single = _weights(tmp_path / "single")
    moved = max(float((single[n] - _weights(tied_pair[1])[n]).abs().max()) for n in single)
    assert moved > 1e-3  # training changed the weights, so the comparison below means something
    for name in single:
        torch.testing.assert_close(straight[name], single[name], rtol=0, atol=2e-5, msg=name)


@pytest.mark.parametrize("extra, message", [({"lora": True}, "--fsdp with --lora"),
                                            ({"mixed_precision": "fp16"}, "bf16 or no")])
def test_fsdp_refuses_what_it_cannot_do_in_one_line(tied_pair, shared_data, tmp_path, extra, message):
    with pytest.raises(CBOPruneError, match=message):
        heal(HealConfig(**_kw(tied_pair, shared_data, tmp_path / "x", fsdp=True, **extra)), progress=False)


def test_fsdp_without_a_process_group_is_one_line(tied_pair, shared_data, tmp_path):
    with pytest.raises(CBOPruneError, match="process group"):
        heal(HealConfig(**_kw(tied_pair, shared_data, tmp_path / "x", fsdp=True)), progress=False)
    assert not (tmp_path / "x").exists()
