"""Shared fixtures: tiny random models built offline from config classes, and the real default model."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

# A suite started in the background by a non-interactive shell (`make test &`, nohup) inherits SIGINT
# as ignored, and so would every subprocess the interrupt tests signal. Restore Python's handler, so
# that the children start with SIGINT live and those tests test the code, not the launcher.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CBOPRUNE_DATA_DIR", REPO.parent / "shared" / "data"))


def tiny_llama(n_layers: int = 6, seed: int = 0, vocab_size: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    # Random init leaves branch outputs tiny next to the residual; scale them up so that removing
    # a block changes the logits clearly and the tests can fail.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(8.0)
            layer.mlp.down_proj.weight.mul_(8.0)
    return model


def save_tiny_checkpoint(path: Path, n_layers: int = 6, seed: int = 0) -> Path:
    """A random tiny Llama with the default model's tokenizer, saved like any HF checkpoint."""
    from transformers import AutoTokenizer

    from cboprune.models.loading import resolve_model_source

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source("default")[0])
    model = tiny_llama(n_layers=n_layers, seed=seed, vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random tiny Llama of 6 blocks saved as a checkpoint, shared by the whole session (tests must
    not write into it; a module that needs another depth defines its own)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", n_layers=6)


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def default_model():
    """The real SmolLM2-135M-Instruct (LoadedModel), loaded once per test session."""
    from cboprune.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set CBOPRUNE_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models run faster on one thread (and far faster on a loaded machine, where OpenMP
    threads spin against each other); real-model tests get their worker's share of the cores (all
    of them when pytest runs serially, one each under `make test`'s two xdist workers on 2 cores:
    two workers of 2 threads each spun against each other). Keyed on the model, not on the `slow`
    mark: a long tiny-model test is still a tiny-model test."""
    threads = 1
    if request.node.get_closest_marker("real_model"):
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        threads = max(1, (os.cpu_count() or 1) // workers)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- no NaN in any output
# A NaN is never a result (issue 34): after the whole session, every report and results file the
# suite wrote under pytest's temporary directory is read; a NaN or infinity literal fails the run.
_NAN_LITERAL = re.compile(r"(?<![\w.])-?(nan|NaN|inf|Infinity)(?![\w])")
REPORT_SUFFIXES = (".json", ".md", ".csv")
#: files written by transformers / tokenizers (a vocabulary holds the words "nan" and "inf")
NOT_OURS = re.compile(r"^(tokenizer.*|vocab|special_tokens_map|added_tokens|config|generation_config|"
                      r"model\.safetensors\.index|chat_template|merges)\.(json|txt|jinja)$|^README\.md$")


def _json_nan(text: str) -> bool:
    found = []

    def constant(name):
        found.append(name)
        return None

    try:
        json.loads(text, parse_constant=constant)
    except ValueError:
        return False  # not JSON (a crafted bad file): not a result
    return bool(found)


def nan_literals(root: Path) -> list[str]:
    """Every report or results file under `root` holding a NaN / infinity literal: a JSON number
    constant NaN / Infinity, or the word nan / inf as a cell of a markdown or CSV table."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix not in REPORT_SUFFIXES or NOT_OURS.match(path.name) or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if path.suffix == ".json":
            if _json_nan(text):
                found.append(f"{path}: NaN or Infinity in JSON")
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if _NAN_LITERAL.search(line):
                found.append(f"{path}:{number}: {line.strip()[:160]}")
    return found


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):  # pytest-xdist worker: the controller scans everything
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    try:
        root = factory.getbasetemp()
    except (OSError, ValueError):
        return
    found = nan_literals(root)
    if found:
        session.config.get_terminal_writer().line(
            "NaN or infinity written as a result (issue 34: a NaN is never a result):\n  " + "\n  ".join(found[:50]),
            red=True)
        session.exitstatus = 1


def pytest_collection_modifyitems(session, config, items):
    """The real-model tests first: they are the longest (up to 3.5 min each on one core), and started
    last they left one xdist worker running alone for the suite's last 6 minutes (measured, README "Tests")."""
    items.sort(key=lambda item: item.get_closest_marker("real_model") is None)
