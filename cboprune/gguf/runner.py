"""llama.cpp, the program most people run GGUF files with, through llama-cpp-python (the `gguf`
extra: `make setup-gguf`, or `pip install -e '.[gguf]'`; it compiles llama.cpp from source).

    with open_llama("pruned.gguf") as llm:
        logits = prompt_logits(llm, [1, 520, 3012])   # [T, V] float32, llama.cpp's own forward
        text = greedy_text(llm, "The capital of France is", 16)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cboprune.core.errors import CBOPruneError
from cboprune.gguf.prune import open_gguf

log = logging.getLogger(__name__)

INSTALL_HINT = "run `make setup-gguf` (or `pip install -e '.[gguf]'`; it builds llama.cpp, several minutes)"


def llama_cpp_module() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise CBOPruneError(f"llama-cpp-python is not installed: {INSTALL_HINT}") from None
    return llama_cpp


@contextlib.contextmanager
def open_llama(path: str | Path, *, n_ctx: int = 512, n_threads: int | None = None, logits_all: bool = True,
               n_batch: int = 512) -> Iterator[Any]:
    """A `llama_cpp.Llama` on the CPU for `path`, closed afterwards. A file llama.cpp refuses
    (bad metadata, missing tensors) is one line, with llama.cpp's own reason kept in the log."""
    llama_cpp = llama_cpp_module()

    source = open_gguf(path)  # our checks first: one line for a damaged or foreign file
    threads = n_threads or os.cpu_count() or 1
    try:
        llm = llama_cpp.Llama(model_path=str(source.path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                              n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, logits_all=logits_all,
                              verbose=False, seed=0)
    except (ValueError, RuntimeError) as exc:
        raise CBOPruneError(f"llama.cpp could not load {source.path} ({str(exc).splitlines()[0]}): the file's "
                            "metadata or tensors do not match its architecture") from None
    try:
        yield llm
    finally:
        llm.close()


def prompt_logits(llm: Any, tokens: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `tokens` [T] -> [T, V] (needs logits_all)."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def last_logits(llm: Any) -> np.ndarray:
    """The logits of the last evaluated token [V] (works without logits_all)."""
    llama_cpp = llama_cpp_module()
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def greedy_tokens(llm: Any, tokens: Sequence[int], n_new: int) -> list[int]:
    """`n_new` greedy tokens after `tokens` (argmax of llama.cpp's logits, KV cache on)."""
    llm.reset()
    llm.eval(list(tokens))
    out = []
    for _ in range(n_new):
        nxt = int(np.argmax(last_logits(llm)))
        out.append(nxt)
        if nxt == llm.token_eos():
            break
        llm.eval([nxt])
    return out


def greedy_text(llm: Any, prompt: str, n_new: int = 32, *, chat: bool = True) -> str:
    """Greedy continuation of `prompt`, through the model's chat template when it has one."""
    if chat and llm.metadata.get("tokenizer.chat_template"):
        import jinja2

        template = jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"])
        prompt = template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
    new = greedy_tokens(llm, ids, n_new)
    return llm.detokenize(new).decode("utf-8", errors="replace")


__all__ = ["INSTALL_HINT", "greedy_text", "greedy_tokens", "last_logits", "llama_cpp_module", "open_llama",
           "prompt_logits"]
