"""Calibration data: local files, hub datasets, or text the model generates for itself.

Two shapes of data, two treatments:
- instruction / chat records are rendered with the model's chat template, one sample each,
  truncated to `seq_len` tokens and right-padded (right padding keeps every real token's causal
  context identical to the unpadded sample, so per-sample gradients do not depend on the batch);
- plain text is concatenated (EOS between documents) and packed into full `seq_len` windows.

Without a data argument the default is model-generated calibration: the built-in prompts in
`prompts.json` answered by the model itself with a fixed seed, cached under the cache directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cboprune.errors import CBOPruneError

log = logging.getLogger(__name__)

MIN_SAMPLE_TOKENS = 16
GENERATED = "generated"
SUPPORTED_FIELDS = ("messages", "conversations", "instruction+output", "prompt+response", "question+answer",
                    "turns", "text")


@dataclass
class CalibrationSet:
    """Tokenized calibration samples.

    input_ids: [m, S] token ids, right-padded; attention_mask: [m, S] 1 for real tokens.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(self.input_ids.numpy().tobytes())
        h.update(self.attention_mask.numpy().tobytes())
        return h.hexdigest()[:16]

    def batches(self, batch_size: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (first sample index, input_ids [b, s], attention_mask [b, s]), trimmed to the
        longest sample of the batch so padding costs no compute."""
        for lo in range(start, self.n_samples, batch_size):
            mask = self.attention_mask[lo:lo + batch_size]
            width = int(mask.sum(dim=1).max())
            yield lo, self.input_ids[lo:lo + batch_size, :width], mask[:, :width]

    def split(self, n_first: int) -> tuple[CalibrationSet, CalibrationSet]:
        """(the first `n_first` samples, the rest): a fitting set and a held-out set."""
        if not 0 < n_first < self.n_samples:
            raise CBOPruneError(f"cannot split {self.n_samples} calibration samples after {n_first}: "
                                "load more samples (--n-samples) or hold out fewer")
        parts = []
        for lo, hi, role in ((0, n_first, "fit"), (n_first, self.n_samples, "held-out")):
            parts.append(CalibrationSet(self.input_ids[lo:hi], self.attention_mask[lo:hi], self.source,
                                        {**self.info, "part": role, "samples": [lo, hi]}))
        return parts[0], parts[1]

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "n_samples": self.n_samples, "n_tokens": self.n_tokens,
                "seq_len": int(self.input_ids.shape[1]), "fingerprint": self.fingerprint, **self.info}


# ----------------------------------------------------------------------------- reading records

def read_records(path: Path) -> list[Any]:
    """Records of a .jsonl / .json file, or the whole text of a .txt file as one record."""
    if not path.is_file():
        raise CBOPruneError(f"calibration data not found: {path}. Pass an existing .jsonl, .json or .txt file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CBOPruneError(f"cannot read calibration file {path}: {exc}") from exc
    if suffix == ".txt":
        return [{"text": text}] if text.strip() else []
    if suffix == ".jsonl":
        records = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise CBOPruneError(f"{path}:{line_no} is not valid JSON ({exc.msg}): fix or remove "
                                        "that line") from None
        return records
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CBOPruneError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, dict):  # {"data": [...]} / {"examples": [...]} wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            data = lists[0] if len(lists) == 1 else [data]
        return list(data)
    raise CBOPruneError(f"unsupported calibration file type {path.suffix!r} ({path}): use .jsonl, .json or .txt")


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def record_to_messages(record: Any) -> list[dict[str, str]] | str:
    """A chat message list for instruction/chat records, or a plain string for text records."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise ValueError("record is not a JSON object")
    if "messages" in record:
        return [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    if "conversations" in record:
        return [{"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in record["conversations"]]
    for q, a in (("instruction", "output"), ("instruction", "response"), ("prompt", "response"),
                 ("prompt", "completion"), ("question", "answer")):
        if q in record and a in record:
            user = record[q] if not record.get("input") else f"{record[q]}\n\n{record['input']}"
            return [{"role": "user", "content": user}, {"role": "assistant", "content": record[a]}]
    if "turns" in record:  # questions only (e.g. MT-Bench): one user message
        return [{"role": "user", "content": "\n\n".join(record["turns"])}]
    if "text" in record:
        return record["text"]
    raise ValueError(f"no known fields (found {sorted(record)[:6]})")


def records_to_messages(records: list[Any], source: str) -> list[list[dict[str, str]] | str]:
    """record_to_messages for every record; a malformed one is a one-line error naming it."""
    converted = []
    for i, record in enumerate(records):
        try:
            converted.append(record_to_messages(record))
        except (ValueError, KeyError, TypeError) as exc:
            raise CBOPruneError(f"{source}: record {i} is malformed ({exc}); supported record fields: "
                                f"{', '.join(SUPPORTED_FIELDS)}") from None
    return converted


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n\n".join(m["content"] for m in messages)


# ----------------------------------------------------------------------------- building samples

def pad_samples(samples: list[list[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(samples), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), seq_len), dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, :len(sample)] = torch.tensor(sample, dtype=torch.long)
        mask[row, :len(sample)] = 1
    return ids, mask


def build_calibration(records: list[Any], tokenizer, *, n_samples: int, seq_len: int, seed: int,
                      source: str) -> CalibrationSet:
    """Tokenize records into at most `n_samples` samples of at most `seq_len` tokens."""
    if n_samples < 1 or seq_len < MIN_SAMPLE_TOKENS:
        raise CBOPruneError(f"need n_samples >= 1 and seq_len >= {MIN_SAMPLE_TOKENS}, got {n_samples} and {seq_len}")
    converted = records_to_messages(records, source)
    texts = [c for c in converted if isinstance(c, str) and c.strip()]
    chats = [c for c in converted if not isinstance(c, str)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rng = random.Random(seed)
    if chats:
        rng.shuffle(chats)
        samples = []
        for messages in chats:
            ids = tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"][:seq_len]
            if len(ids) >= MIN_SAMPLE_TOKENS:
                samples.append(ids)
            if len(samples) == n_samples:
                break
        kind = "chat"
    else:
        rng.shuffle(texts)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream: list[int] = []
        for text in texts:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
            if len(stream) >= n_samples * seq_len:
                break
        samples = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)][:n_samples]
        kind = "packed text"
    if not samples:
        what = f"{MIN_SAMPLE_TOKENS} tokens" if kind == "chat" else f"one window of {seq_len} tokens"
        raise CBOPruneError(f"calibration data {source} is empty or too short: no sample reaches {what}. "
                            "Pass more data or a smaller --seq-len")
    if len(samples) < n_samples:
        log.warning("calibration data %s gave %d samples, fewer than the %d requested", source, len(samples), n_samples)
    ids, mask = pad_samples(samples, seq_len, pad_id)
    return CalibrationSet(ids, mask, source=source, info={"kind": kind, "seed": seed})


# ----------------------------------------------------------------------------- generated calibration

def builtin_prompts() -> list[dict[str, str]]:
    data = json.loads(resources.files("cboprune.data").joinpath("prompts.json").read_text(encoding="utf-8"))
    return data["prompts"]


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.9
    batch_size: int = 16
    seed: int = 0


def model_fingerprint(model) -> str:
    """Identifies weights cheaply: config plus a checksum of the input embedding."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    emb = model.get_input_embeddings().weight.detach()
    h.update(f"{float(emb.double().sum()):.10e}|{float(emb[:64].double().abs().sum()):.10e}".encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def generate_calibration(model, tokenizer, settings: GenerationSettings = GenerationSettings(),
                         prompts: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """The model answers the prompts (sampling with a fixed seed); returns chat records, cached."""
    prompts = prompts if prompts is not None else builtin_prompts()
    key = hashlib.sha256(json.dumps([model_fingerprint(model), prompts, asdict(settings)],
                                    sort_keys=True).encode()).hexdigest()[:16]
    from cboprune.models.loading import cache_dir

    cache_file = cache_dir() / "calibration" / f"generated-{key}.jsonl"
    if cache_file.is_file():
        return [json.loads(line) for line in cache_file.read_text().splitlines() if line.strip()]

    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)
    records = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right end of every prompt
    try:
        for lo in tqdm(range(0, len(prompts), settings.batch_size), desc="generating calibration answers",
                       unit="batch"):
            chunk = prompts[lo:lo + settings.batch_size]
            messages = [[{"role": "user", "content": p["prompt"]}] for p in chunk]
            texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                     if getattr(tokenizer, "chat_template", None) else m[0]["content"] for m in messages]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                                 max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            for p, row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                answer = tokenizer.decode(row, skip_special_tokens=True).strip()
                records.append({"category": p.get("category", ""), "messages": [
                    {"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": answer}]})
    finally:
        tokenizer.padding_side = old_side
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, cache_file)
    return records


# ----------------------------------------------------------------------------- entry point

def _looks_like_hub_dataset(spec: str) -> bool:
    return not spec.startswith((".", "/", "~")) and spec.count("/") <= 1 and not Path(spec).suffix


def load_calibration(data: str | None, tokenizer, *, model=None, n_samples: int = 64, seq_len: int = 256,
                     seed: int = 0, generation: GenerationSettings | None = None,
                     split: str = "train") -> CalibrationSet:
    """Calibration samples from `data`: None / "generated" (the model answers built-in prompts),
    a local .jsonl/.json/.txt file, or a hub dataset name (online only)."""
    if data in (None, "", GENERATED):
        if model is None:
            raise CBOPruneError("model-generated calibration needs the model: pass --data FILE instead")
        records = generate_calibration(model, tokenizer, generation or GenerationSettings(seed=seed))
        return build_calibration(records, tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed,
                                 source=GENERATED)
    path = Path(data).expanduser()
    if path.exists() or not _looks_like_hub_dataset(data):
        return build_calibration(read_records(path), tokenizer, n_samples=n_samples, seq_len=seq_len,
                                 seed=seed, source=str(path))
    try:
        import datasets  # optional: only for hub dataset names
    except ImportError:
        raise CBOPruneError(f"{data!r} is not a local file and the `datasets` package is not installed "
                            "to fetch it from the hub: pass a local .jsonl/.json/.txt file") from None
    try:
        ds = datasets.load_dataset(data, split=split)
    except Exception as exc:  # hub errors come in many types; the message is what matters
        raise CBOPruneError(f"cannot load dataset {data!r} from the hub ({type(exc).__name__}); offline? "
                            "pass a local .jsonl/.json/.txt file") from None
    return build_calibration(list(ds), tokenizer, n_samples=n_samples, seq_len=seq_len, seed=seed,
                             source=f"hub:{data}:{split}")
