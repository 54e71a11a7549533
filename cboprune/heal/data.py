"""Distillation data: chat records rendered with the chat template, with a loss mask.

Each sample carries input_ids, attention_mask and loss_mask ([S] each). With `loss_on="responses"`
only the last assistant message's tokens count (the usual convention for instruction tuning);
with "all" every real token counts (the usual convention for logit distillation, and the only
choice for plain text). A fixed fraction of records is held out (by seed) for the held-out loss.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from cboprune.data.calibration import (MIN_SAMPLE_TOKENS, pad_samples, read_records, records_to_messages,
                                       render_chat)
from cboprune.core.errors import CBOPruneError


@dataclass
class TokenizedSet:
    """input_ids, attention_mask, loss_mask: [n, S], right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "loss_mask": self.loss_mask[i]}


def _tokenize(item, tokenizer, seq_len: int, loss_on: str) -> tuple[list[int], int] | None:
    """(token ids, index of the first token that counts for the loss) or None if too short."""
    if isinstance(item, str):
        ids = tokenizer(item, add_special_tokens=False)["input_ids"][:seq_len]
        start = 0
    else:
        ids = tokenizer(render_chat(tokenizer, item), add_special_tokens=False)["input_ids"][:seq_len]
        start = 0
        if loss_on == "responses" and item and item[-1]["role"] == "assistant":
            prompt = item[:-1]
            if getattr(tokenizer, "chat_template", None):
                prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            else:
                prefix = render_chat(tokenizer, prompt) + "\n\n"
            start = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    if len(ids) < MIN_SAMPLE_TOKENS or start >= len(ids) - 1:
        return None
    return ids, start


def read_distillation_items(path: str | Path) -> list:
    """The records of a .jsonl/.json/.txt file as chat messages or texts (validated; no tokenizer
    needed, so callers check the data before loading any model)."""
    path = Path(path)
    items = records_to_messages(read_records(path), str(path))
    if len(items) == 1 and isinstance(items[0], str):  # one long text: split into paragraphs
        items = [p for p in items[0].split("\n\n") if p.strip()]
    if not items:
        raise CBOPruneError(f"distillation data {path} holds no records: pass a file with some")
    return items


def load_distillation_data(path: str | Path, tokenizer, *, seq_len: int = 256, heldout_fraction: float = 0.05,
                           max_samples: int | None = None, heldout_samples: int | None = None,
                           loss_on: str = "all", seed: int = 0, items: list | None = None
                           ) -> tuple[TokenizedSet, TokenizedSet]:
    """(train, held-out) sets from a .jsonl/.json/.txt file (or its `items`, already read);
    held-out records never train."""
    if loss_on not in ("all", "responses"):
        raise CBOPruneError(f"loss_on must be 'all' or 'responses', got {loss_on!r}")
    path = Path(path)
    # A study heals many students on one file with one tokenizer: tokenize it once per process.
    key = (_items_key(path, items), tokenizer_fingerprint(tokenizer), seq_len, heldout_fraction, max_samples,
           heldout_samples, loss_on, seed)
    if key not in _TOKENIZED:
        _TOKENIZED.clear()  # the last data only: a large file's tensors are large
        _TOKENIZED[key] = _tokenize_split(path, tokenizer, seq_len, heldout_fraction, max_samples,
                                          heldout_samples, loss_on, seed, items)
    return _TOKENIZED[key]  # read only by the trainer: shared, never written


_TOKENIZED: dict[tuple, tuple[TokenizedSet, TokenizedSet]] = {}


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids and the chat rendering: the tokenizer's full definition (vocabulary,
    merges, normalizer, added tokens, post-processor), its chat template and its pad/eos ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, getattr(tokenizer, "chat_template", None),
                        tokenizer.pad_token_id, tokenizer.eos_token_id, getattr(tokenizer, "bos_token_id", None)])
    return hashlib.sha1((body + extra).encode()).hexdigest()


def _items_key(path: Path, items: list | None) -> tuple:
    if items is not None:
        return ("items", hashlib.sha1(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest())
    stat = path.stat() if path.is_file() else None
    return ("file", str(path.resolve()), stat and stat.st_mtime_ns, stat and stat.st_size)


def _tokenize_split(path: Path, tokenizer, seq_len: int, heldout_fraction: float, max_samples: int | None,
                    heldout_samples: int | None, loss_on: str, seed: int, items: list | None
                    ) -> tuple[TokenizedSet, TokenizedSet]:
    items = list(items if items is not None else read_distillation_items(path))
    random.Random(seed).shuffle(items)
    n_heldout = max(1, round(len(items) * heldout_fraction)) if heldout_fraction > 0 and len(items) > 1 else 0
    held, train = items[:n_heldout], items[n_heldout:]
    sets = []
    for part, limit in ((train, max_samples), (held, heldout_samples)):
        samples = []
        for item in part:
            tok = _tokenize(item, tokenizer, seq_len, loss_on)
            if tok is not None:
                samples.append(tok)
            if limit is not None and len(samples) >= limit:
                break
        sets.append(samples)
    if not sets[0]:
        raise CBOPruneError(f"distillation data {path} has no usable training sample of >= {MIN_SAMPLE_TOKENS} "
                            "tokens: pass more data")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tuple(_collate(s, seq_len, pad_id) for s in sets)  # type: ignore[return-value]


def _collate(samples: list[tuple[list[int], int]], seq_len: int, pad_id: int) -> TokenizedSet:
    ids, mask = pad_samples([tokens for tokens, _ in samples], seq_len, pad_id)
    loss_mask = mask.clone()
    for row, (_, start) in enumerate(samples):
        loss_mask[row, :start] = 0
    return TokenizedSet(ids, mask, loss_mask)
