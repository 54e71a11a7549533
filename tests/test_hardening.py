"""Faults and bad inputs: every one a single `cboprune: error:` line (exit status 2), no traceback, the
output location untouched; interrupted writers leave the complete output or nothing.

Three parts: a table of library-level bad inputs (outputs, loading, surgery, calibration), a table of
command lines run through `cboprune.cli.main`, and interruption tests that SIGKILL / SIGINT a
subprocess in the middle of a checkpoint save and of a Hessian save, then rerun it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cboprune.core import hub, outputs
from cboprune.core.errors import CBOPruneError
from cboprune.models import loading

from conftest import REPO, save_tiny_checkpoint, tiny_llama

WORDS = ("the model removes whole blocks and keeps the rest of the network exactly as it was before so that "
         "the saved checkpoint loads again with the usual tools and generates text with its cache").split()


# ----------------------------------------------------------------------------- assets (built once)

@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Inputs shared by the tables: a tiny checkpoint, broken copies of it, T5/BERT checkpoints, data."""
    from transformers import AutoConfig, BertForMaskedLM, T5ForConditionalGeneration

    root = tmp_path_factory.mktemp("assets")
    ck = save_tiny_checkpoint(root / "ck", n_layers=4)
    a = {"ck": ck}
    for name, damage in (("truncated", "half"), ("garbage", "garbage"), ("badconfig", "config")):
        bad = root / name
        shutil.copytree(ck, bad)
        weights = bad / "model.safetensors"
        if damage == "half":
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        elif damage == "garbage":
            weights.write_bytes(b"\x00not safetensors" * 4)
        else:
            (bad / "config.json").write_text("{not json")
        a[name] = bad
    small = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                 d_model=16, d_ff=16, d_kv=8, num_heads=2, num_layers=1)
    for model_type, cls in (("t5", T5ForConditionalGeneration), ("bert", BertForMaskedLM)):
        path = root / model_type
        cls(AutoConfig.for_model(model_type, **small)).save_pretrained(path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(ck / f, path)
        a[model_type] = path
    (root / "junk.gguf").write_bytes(b"junk" * 64)
    (root / "cut.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    a["junk_gguf"], a["cut_gguf"] = root / "junk.gguf", root / "cut.gguf"
    data = root / "chat.jsonl"
    rng = np.random.default_rng(0)
    data.write_text("".join(json.dumps({"instruction": " ".join(rng.choice(WORDS, 30)),
                                        "output": " ".join(rng.choice(WORDS, 40))}) + "\n" for _ in range(8)))
    a["data"] = data
    (root / "latin1.jinja").write_bytes("caf\xe9 {{ messages }}".encode("latin-1"))
    (root / "broken.jinja").write_text("{% for m in messages %}{{ m.content }")
    (root / "empty.jinja").write_text("  \n")
    for name in ("latin1", "broken", "empty"):
        a[f"{name}_tpl"] = root / f"{name}.jinja"
    return a


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable the way a user sets it (HF_HUB_OFFLINE=1); the reachability cache reset around."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


def _snapshot(root: Path) -> list[tuple[str, int]]:
    """Every path under root (hidden ones too) with its size: 'the output location unchanged'."""
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))


def _one_line(message: str) -> None:
    assert "\n" not in message.strip() and message.strip(), message


# ----------------------------------------------------------------------------- library-level table

def _dir_with_file(w: Path) -> Path:
    (w / "out").mkdir()
    (w / "out" / "keep.txt").write_text("x")
    return w / "out"


def _file(w: Path, name: str = "file.txt") -> Path:
    (w / name).write_text("x")
    return w / name


def _readonly(monkeypatch):
    """Root ignores file modes, so a read-only location is simulated at the one access check."""
    monkeypatch.setattr(outputs, "_writable", lambda d: False)


def _save_hessian_into_dir(w: Path, a) -> None:
    from cboprune.selection.hessian import HESSIAN_FORMAT, HessianResult, save_hessian

    (w / "h").mkdir()
    meta = {"format": HESSIAN_FORMAT, "n_blocks": 2}
    save_hessian(HessianResult(A=np.ones((3, 2), np.float32), losses=np.zeros(3), meta=meta), w / "h")


def _calibration(a, **kw):
    from transformers import AutoTokenizer

    from cboprune.data.calibration import load_calibration

    tok = AutoTokenizer.from_pretrained(a["ck"])
    return load_calibration(str(a["data"]), tok, n_samples=2, seq_len=32, **kw)


LIBRARY_CASES = {
    # outputs
    "dir is a file": (lambda w, a, mp: outputs.check_output_dir(_file(w), True), "is a file"),
    "dir is cwd": (lambda w, a, mp: (mp.chdir(w), outputs.check_output_dir(".", True)), "current directory"),
    "dir is parent of cwd": (lambda w, a, mp: ((w / "sub").mkdir(), mp.chdir(w / "sub"),
                                               outputs.check_output_dir(w, True)), "current directory"),
    "dir not empty": (lambda w, a, mp: outputs.check_output_dir(_dir_with_file(w), False), "not empty"),
    "dir parent is a file": (lambda w, a, mp: outputs.check_output_dir(_file(w) / "out", False), "is a file"),
    "dir read-only": (lambda w, a, mp: (_readonly(mp), outputs.check_output_dir(w / "out", False)), "not writable"),
    # /proc: os.access says yes to root, yet nothing can be created there (as on a read-only mount)
    "dir in /proc": (lambda w, a, mp: outputs.check_output_dir("/proc/cboprune-out", False), "not writable"),
    "file in /proc": (lambda w, a, mp: outputs.check_output_file("/proc/h.safetensors"), "not writable"),
    "file is a dir": (lambda w, a, mp: outputs.check_output_file(_dir_with_file(w), True), "is a directory"),
    "file exists": (lambda w, a, mp: outputs.check_output_file(_file(w), False), "exists"),
    "file path ends with a slash": (lambda w, a, mp: outputs.check_output_file(f"{w}/newdir/"), "is a directory"),
    "file parent is a file": (lambda w, a, mp: outputs.check_output_file(_file(w) / "h.safetensors"), "is a file"),
    "file read-only": (lambda w, a, mp: (_readonly(mp), outputs.check_output_file(w / "h.safetensors")),
                       "not writable"),
    "hessian into a dir": (lambda w, a, mp: _save_hessian_into_dir(w, a), "is a directory"),
    # surgery
    "duplicate blocks": (lambda w, a, mp: __import__("cboprune.models.surgery", fromlist=["x"]).validate_removal(
        [3, 3], 6), "listed more than once"),
    "block out of range": (lambda w, a, mp: __import__("cboprune.models.surgery", fromlist=["x"]).validate_removal(
        [7], 6), "must lie in 0..5"),
    # loading
    "device gpu": (lambda w, a, mp: loading.check_device("gpu"), "invalid device"),
    "device cpu:x": (lambda w, a, mp: loading.check_device("cpu:x"), "invalid device"),
    "device cuda:99": (lambda w, a, mp: loading.check_device("cuda:99"), "cuda"),
    "device meta": (lambda w, a, mp: loading.check_device("meta"), "not available"),
    "truncated safetensors": (lambda w, a, mp: loading.load_model(str(a["truncated"])), "is corrupt"),
    "garbage safetensors": (lambda w, a, mp: loading.load_model(str(a["garbage"])), "is corrupt"),
    "config not json": (lambda w, a, mp: loading.load_model(str(a["badconfig"])), "not readable JSON"),
    "t5": (lambda w, a, mp: loading.load_model(str(a["t5"])), "not a decoder-only causal LM"),
    "bert": (lambda w, a, mp: loading.load_model(str(a["bert"])), "not a decoder-only causal LM"),
    "not a gguf": (lambda w, a, mp: loading.load_model(str(a["junk_gguf"])), "not a GGUF file"),
    "truncated gguf": (lambda w, a, mp: loading.load_model(str(a["cut_gguf"])), "corrupt or truncated"),
    "model is a file": (lambda w, a, mp: loading.load_model(str(_file(w))), "is a file"),
    # calibration
    "seq_len beyond context": (lambda w, a, mp: __import__("cboprune.data.calibration", fromlist=["x"]).check_seq_len(
        4096, tiny_llama(n_layers=1)), "exceeds the model's context of 128"),
    "template missing": (lambda w, a, mp: _calibration(a, chat_template=w / "nope.jinja"), "not found"),
    "template not utf-8": (lambda w, a, mp: _calibration(a, chat_template=a["latin1_tpl"]), "UTF-8"),
    "template empty": (lambda w, a, mp: _calibration(a, chat_template=a["empty_tpl"]), "is empty"),
    "template broken": (lambda w, a, mp: _calibration(a, chat_template=a["broken_tpl"]), "does not render"),
}


@pytest.mark.parametrize("case", list(LIBRARY_CASES))
def test_library_bad_input_is_one_line(case, assets, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    action, fragment = LIBRARY_CASES[case]
    with pytest.raises(CBOPruneError) as err:
        action(work, assets, monkeypatch)
    _one_line(str(err.value))
    assert fragment in str(err.value), str(err.value)
    assert not [p for p in work.rglob("*") if ".cboprune-" in p.name], "no staging or temp file left behind"


def test_missing_model_offline_fails_at_once(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    for name in ("mymodel", "some-org/unknown-model"):
        with pytest.raises(CBOPruneError, match="the path does not exist and the hub is unreachable") as err:
            loading.load_model(name)
        _one_line(str(err.value))
    assert time.perf_counter() - start < 5, "offline, no hub retries"


def test_removal_json_is_strict_json_with_null_for_nan(tmp_path):
    from cboprune.models.surgery import save_pruned

    model = tiny_llama(n_layers=2)
    out = save_pruned(model, None, tmp_path / "ck", {"energy": float("nan"), "scores": [1.0, float("inf")],
                                                      "value": np.float32(2.5)})
    text = (out / "removal.json").read_text()

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    data = json.loads(text, parse_constant=refuse)
    assert data == {"energy": None, "scores": [1.0, None], "value": 2.5}


def test_chat_records_without_template_warn_once_and_a_template_file_renders_them(assets, tmp_path, caplog):
    from transformers import AutoTokenizer

    from cboprune.data import calibration

    tok = AutoTokenizer.from_pretrained(assets["ck"])
    tok.chat_template = None
    tok.name_or_path = f"no-template-{tmp_path.name}"  # a fresh name: the warning is once per tokenizer
    with caplog.at_level("WARNING", logger="cboprune.data.calibration"):
        plain = calibration.load_calibration(str(assets["data"]), tok, n_samples=3, seq_len=32)
        calibration.load_calibration(str(assets["data"]), tok, n_samples=3, seq_len=32)
    assert sum("has no chat template" in r.message for r in caplog.records) == 1
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}")
    rendered = calibration.load_calibration(str(assets["data"]), tok, n_samples=3, seq_len=32,
                                            chat_template=template)
    assert not torch.equal(plain.input_ids, rendered.input_ids)
    text = tok.decode(rendered.input_ids[0][rendered.attention_mask[0] == 1])
    assert text.startswith("<|user|>")


def test_files_we_wrote_are_read_back_strictly(tmp_path):
    # removal.json and friends may be damaged or replaced by a user: one line, never a traceback
    from cboprune.heal.cli import teacher_from_removal
    from cboprune.core.outputs import read_json_object

    f = tmp_path / "removal.json"
    for text, match in (("{oops", "cannot be read as JSON"), ("[1]", "not a JSON object"),
                        (b"\xff\xfe{", "cannot be read as JSON")):
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(CBOPruneError, match=match):
            read_json_object(f, "restore it")
        with pytest.raises(CBOPruneError, match="pass --teacher"):
            teacher_from_removal(str(tmp_path))
    f.write_text('{"source_model": ["not", "a", "name"]}')
    with pytest.raises(CBOPruneError, match="pass --teacher"):
        teacher_from_removal(str(tmp_path))
    f.write_text('{"source_model": "default"}')
    assert teacher_from_removal(str(tmp_path)) == "default"


def test_a_crafted_hessian_file_is_refused_in_one_line(tmp_path):
    from safetensors.numpy import save_file

    from cboprune.selection.hessian import HESSIAN_FORMAT, load_hessian

    rng = np.random.default_rng(0)
    good = {"format": HESSIAN_FORMAT, "n_blocks": 6}
    nan = rng.normal(size=(8, 6)).astype(np.float32)
    nan[0, 0] = np.nan
    cases = {"meta": (rng.normal(size=(8, 6)), [1, 2], 8, "not a cboprune-hessian"),
             "empty": (np.zeros((0, 6)), good, 0, "inconsistent"),
             "losses": (rng.normal(size=(8, 6)), good, 3, "inconsistent"),
             "nan": (nan, good, 8, "non-finite")}
    for name, (A, meta, n_losses, match) in cases.items():
        f = tmp_path / f"{name}.safetensors"
        save_file({"A": A.astype(np.float32), "losses": np.zeros(n_losses, np.float32)}, str(f),
                  metadata={"cboprune": json.dumps(meta)})
        with pytest.raises(CBOPruneError, match=match):
            load_hessian(f)


def test_seq_len_check_runs_before_the_data_is_read(tmp_path):
    from cboprune.data.calibration import load_calibration

    model = tiny_llama(n_layers=1)  # max_position_embeddings = 128
    with pytest.raises(CBOPruneError, match="exceeds the model's context of 128 tokens"):
        load_calibration(str(tmp_path / "does-not-exist.jsonl"), None, model=model, seq_len=129)
    with pytest.raises(CBOPruneError, match="calibration data not found"):
        load_calibration(str(tmp_path / "does-not-exist.jsonl"), None, model=model, seq_len=128)


def test_check_data_validates_a_file_without_a_model(tmp_path):
    from cboprune.data.calibration import check_data

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "hello"}) + "\n")
    assert check_data(str(good)) == 1 and check_data(None) is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(CBOPruneError, match="bad.jsonl:2 is not valid JSON"):
        check_data(str(bad))
    fields = tmp_path / "fields.jsonl"
    fields.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(CBOPruneError, match="record 0 is malformed"):
        check_data(str(fields))


# ----------------------------------------------------------------------------- staging units

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_staging_of_a_killed_run_is_removed_and_a_moved_away_output_restored(tmp_path):
    import socket

    host, pid = socket.gethostname(), _dead_pid()
    target = tmp_path / "out"
    stale = tmp_path / f".out.cboprune-staging-{host}-{pid}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    old = tmp_path / f".out.cboprune-old-{host}-{pid}-deadbeef"
    old.mkdir()
    (old / "config.json").write_text("{}")
    alive = tmp_path / f".out.cboprune-staging-{host}-{os.getpid()}-cafecafe"  # our own: not stale
    alive.mkdir()
    other = tmp_path / ".out.cboprune-staging-another-host-1-abcdabcd"  # another machine's: not ours to judge
    other.mkdir()
    outputs.clean_stale_staging(target)
    assert not stale.exists() and not old.exists() and alive.exists() and other.exists()
    assert (target / "config.json").is_file(), "the previous output is put back"


def test_staged_dir_replaces_atomically_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "out"
    with outputs.staged_dir(target) as stage:
        (stage / "a").write_text("1")
    assert (target / "a").read_text() == "1"
    with pytest.raises(RuntimeError), outputs.staged_dir(target, overwrite=True) as stage:
        (stage / "b").write_text("2")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "a").is_file()
    with outputs.staged_dir(target, overwrite=True) as stage:
        (stage / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- CLI-level table

def _cli_cases(a: dict[str, Path]) -> dict[str, tuple[list[str], str, str]]:
    """name -> (argv with {w} for the work directory, expected fragment, output path relative to {w})."""
    ck, data = str(a["ck"]), str(a["data"])
    hess = ["-q", "hessian", "--model", ck, "--data", data, "--n-samples", "2", "--seq-len", "32", "--batch-size", "2"]
    prune = ["-q", "prune", "--model", ck, "--blocks", "1"]
    return {
        "archs missing model offline": (["archs", "--model", "mymodel"], "hub is unreachable", ""),
        "archs t5": (["archs", "--model", str(a["t5"])], "not a decoder-only causal LM", ""),
        "archs bert": (["archs", "--model", str(a["bert"])], "not a decoder-only causal LM", ""),
        "archs truncated": (["archs", "--model", str(a["truncated"])], "is corrupt", ""),
        "archs bad config": (["archs", "--model", str(a["badconfig"])], "not readable JSON", ""),
        "archs junk gguf": (["archs", "--model", str(a["junk_gguf"])], "not a GGUF file", ""),
        "archs truncated gguf": (["archs", "--model", str(a["cut_gguf"])], "corrupt or truncated", ""),
        "prune device gpu": (prune + ["--device", "gpu", "--output-dir", "{w}/out"], "invalid device", "out"),
        "prune into cwd": (prune + ["--output-dir", ".", "--overwrite"], "current directory", ""),
        "prune into parent of cwd": (prune + ["--output-dir", "..", "--overwrite"], "current directory", ""),
        "prune into a file": (prune + ["--output-dir", "{w}/file.txt"], "is a file", "file.txt"),
        "prune truncated model": (["-q", "prune", "--model", str(a["truncated"]), "--blocks", "1", "--output-dir",
                                   "{w}/out"], "is corrupt", "out"),
        "prune block out of range": (["-q", "prune", "--model", ck, "--blocks", "9", "--output-dir", "{w}/out"],
                                     "must lie in 0..3", "out"),
        "hessian seq-len beyond context": (hess[:-4] + ["--seq-len", "4096", "--output", "{w}/h.safetensors"],
                                           "exceeds the model's context of 128", "h.safetensors"),
        "hessian into a directory": (hess + ["--output", "{w}/dir", "--overwrite"], "is a directory", "dir"),
        "hessian t5": (["-q", "hessian", "--model", str(a["t5"]), "--data", data, "--output", "{w}/h.safetensors"],
                       "not a decoder-only causal LM", "h.safetensors"),
        "hessian device cpu:x": (hess + ["--device", "cpu:x", "--output", "{w}/h.safetensors"], "invalid device",
                                 "h.safetensors"),
        "run truncated model": (["-q", "run", "--model", str(a["truncated"]), "--data", data, "--remove", "1",
                                 "--output-dir", "{w}/run"], "is corrupt", "run"),
    }


CLI_NAMES = list(_cli_cases({k: Path(k) for k in ("ck", "data", "t5", "bert", "truncated", "badconfig",
                                                  "junk_gguf", "cut_gguf")}))
#: Cases that need the command layer to pass its input through unchanged (wired by the lead in cli.py).
NEEDS_CLI = {
    "prune duplicate blocks": (["-q", "prune", "--model", "{ck}", "--blocks", "1,1", "--output-dir", "{w}/out"],
                               "listed more than once", "out"),
}


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from cboprune.cli import main

    rc = main(argv)
    return rc, capsys.readouterr().err


def _check_cli_case(argv, fragment, watched, work: Path, capsys, monkeypatch):
    (work / "file.txt").write_text("x")
    (work / "dir").mkdir()
    (work / "cwd").mkdir()
    (work / "cwd" / "mine.txt").write_text("do not delete")
    monkeypatch.chdir(work / "cwd")
    before = _snapshot(work.parent)
    rc, err = _run_cli([x.replace("{w}", str(work)) for x in argv], capsys)
    lines = [line for line in err.splitlines() if line.startswith("cboprune: error:")]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment in lines[0], lines[0]
    assert _snapshot(work.parent) == before, "the output location must be unchanged"


@pytest.mark.parametrize("case", CLI_NAMES)
def test_cli_bad_input_is_one_line(case, assets, tmp_path, capsys, monkeypatch, offline):
    argv, fragment, watched = _cli_cases(assets)[case]
    (tmp_path / "w").mkdir()
    _check_cli_case(argv, fragment, watched, tmp_path / "w", capsys, monkeypatch)


@pytest.mark.parametrize("case", list(NEEDS_CLI))
def test_cli_bad_input_needing_the_command_layer(case, assets, tmp_path, capsys, monkeypatch):
    argv, fragment, watched = NEEDS_CLI[case]
    (tmp_path / "w").mkdir()
    argv = [x.replace("{ck}", str(assets["ck"])) for x in argv]
    _check_cli_case(argv, fragment, watched, tmp_path / "w", capsys, monkeypatch)


# ----------------------------------------------------------------------------- interruption

_CHILD_PRUNE = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import tiny_llama
from cboprune.models.surgery import remove_blocks, save_pruned

class SlowTokenizer:  # save_pretrained runs after the weights are in the staging directory
    def save_pretrained(self, path):
        print("READY", flush=True)
        time.sleep(60)

model = remove_blocks(tiny_llama(n_layers=4), [1])
save_pruned(model, SlowTokenizer(), {target!r}, {{"removed": [1]}}, overwrite=True)
"""

_CHILD_HESSIAN = """
import sys, time
import numpy as np
import safetensors.numpy
from cboprune.selection.hessian import HESSIAN_FORMAT, HessianResult, save_hessian

real = safetensors.numpy.save_file
def slow(tensors, filename, metadata=None):  # the staging file is written, the rename has not happened
    real(tensors, filename, metadata=metadata)
    print("READY", flush=True)
    time.sleep(60)
safetensors.numpy.save_file = slow
meta = {{"format": HESSIAN_FORMAT, "n_blocks": 4}}
save_hessian(HessianResult(A=np.full((64, 4), 2.0, np.float32), losses=np.zeros(64), meta=meta), {target!r})
"""


def _interrupt(script: str, sig: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read() if proc.poll() is not None else line
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0


def _staging(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".cboprune-" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "previous"), [(signal.SIGKILL, False), (signal.SIGKILL, True), (signal.SIGINT, True)],
                         ids=["SIGKILL-fresh", "SIGKILL-replacing", "SIGINT-replacing"])
def test_checkpoint_save_interrupted_leaves_all_or_nothing_and_a_rerun_succeeds(sig, previous, tmp_path):
    from transformers import AutoModelForCausalLM

    from cboprune.models.surgery import remove_blocks, save_pruned

    target = tmp_path / "pruned"
    if previous:
        save_pruned(tiny_llama(n_layers=2), None, target, {"removed": [], "old": True})
    before = _snapshot(tmp_path)
    _interrupt(_CHILD_PRUNE.format(tests=str(REPO / "tests"), target=str(target)), sig)
    leftovers = _staging(tmp_path)
    if sig == signal.SIGINT:  # caught: the staging directory is removed at once
        assert leftovers == []
    else:  # a kill cannot be caught: the half-written staging directory stays until the next run
        assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()
    assert [s for s in _snapshot(tmp_path) if ".cboprune-" not in s[0]] == before  # old output intact, or none

    save_pruned(remove_blocks(tiny_llama(n_layers=4), [1]), None, target, {"removed": [1]}, overwrite=True)
    assert _staging(tmp_path) == [], "the rerun removes the killed run's staging"
    assert json.loads((target / "removal.json").read_text()) == {"removed": [1]}
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == 3


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_hessian_save_interrupted_keeps_the_previous_file_and_a_rerun_succeeds(sig, tmp_path):
    from cboprune.selection.hessian import HESSIAN_FORMAT, HessianResult, load_hessian, save_hessian

    target = tmp_path / "h.safetensors"
    meta = {"format": HESSIAN_FORMAT, "n_blocks": 4}
    save_hessian(HessianResult(A=np.ones((8, 4), np.float32), losses=np.zeros(8), meta=meta), target)
    old_bytes = target.read_bytes()
    _interrupt(_CHILD_HESSIAN.format(target=str(target)), sig)
    assert target.read_bytes() == old_bytes, "the previous file is untouched"
    assert len(_staging(tmp_path)) == (1 if sig == signal.SIGKILL else 0)
    save_hessian(HessianResult(A=np.full((64, 4), 2.0, np.float32), losses=np.zeros(64), meta=meta), target)
    assert _staging(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["h.safetensors"]
    assert load_hessian(target).A.shape == (64, 4) and math.isclose(float(load_hessian(target).A[0, 0]), 2.0)
