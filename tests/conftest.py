"""Shared fixtures: tiny random models built offline from config classes, and the real default model."""

from __future__ import annotations

import os
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
    threads spin against each other); real-model tests keep every core."""
    if request.node.get_closest_marker("real_model") or request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
