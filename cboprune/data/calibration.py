"""Calibration data: local files, hub datasets, or text the model generates for itself.

Two shapes of data, two treatments:
- instruction / chat records are rendered with the model's chat template, one sample each,
  truncated to `seq_len` tokens and right-padded (right padding keeps every real token's causal
  context identical to the unpadded sample, so per-sample gradients do not depend on the batch);
- plain text is concatenated (EOS between documents) and packed into full `seq_len` windows.

Without a data argument the default is model-generated calibration: the built-in prompts in
`prompts.json` answered by the model itself with a fixed seed, cached under the cache directory.

A tokenizer without a chat template joins a record's messages as plain text, with a warning once;
`chat_template=FILE` (a Jinja template, or a tokenizer_config.json holding one) renders them
instead. A `seq_len` beyond the model's context (`max_position_embeddings`) is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cboprune.core.choices import MixSource, is_mix, parse_mix
from cboprune.core.errors import CBOPruneError
from cboprune.core.hub import hub_reachable
from cboprune.core.outputs import cache_dir, staged_file

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
    converted = _record_to_messages(record)
    # A number or null where text belongs would otherwise fail deep inside the chat template.
    if isinstance(converted, str):
        return converted
    for m in converted:
        for key in ("role", "content"):
            if not isinstance(m[key], str):
                raise ValueError(f"message {key} {m[key]!r} is not a string")
    return converted


def _record_to_messages(record: Any) -> list[dict[str, str]] | str:
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
        if not isinstance(record["text"], str):
            raise ValueError(f"text {record['text']!r} is not a string")
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


#: Config fields that hold a model's context length, in the order they are read.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context(model_or_config: Any) -> tuple[int, str] | None:
    """(context length, the config field holding it), or None for a model without one (Mamba)."""
    config = getattr(model_or_config, "config", model_or_config)
    getter = getattr(config, "get_text_config", None)
    config = getter(decoder=True) if callable(getter) else config
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


def check_seq_len(seq_len: int, model_or_config: Any, flag: str = "--seq-len") -> None:
    """Refuse a calibration (or healing) length beyond the model's context: positions past it are
    untrained (or out of range), so the gradients would describe a model nobody runs."""
    context = model_context(model_or_config)
    if context is not None and seq_len > context[0]:
        raise CBOPruneError(f"{flag} {seq_len} exceeds the model's context of {context[0]} tokens "
                            f"({context[1]}): pass {flag} {context[0]} or less")


def load_chat_template(path: str | Path) -> str:
    """A chat template from a file: Jinja text, or a JSON file (tokenizer_config.json) with "chat_template"."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CBOPruneError(f"chat template file not found: {path}. Pass a Jinja template file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CBOPruneError(f"cannot read chat template {path} ({type(exc).__name__}): "
                            "pass a UTF-8 Jinja file") from None
    if path.suffix.lower() == ".json":
        try:
            text = json.loads(text)["chat_template"]
        except (ValueError, KeyError, TypeError):
            raise CBOPruneError(f"{path} holds no \"chat_template\" string: pass a Jinja template file") from None
        if isinstance(text, list):  # the named-template form [{"name": ..., "template": ...}]
            text = next((t.get("template") for t in text if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(text, str) or not text.strip():
        raise CBOPruneError(f"chat template {path} is empty: pass a Jinja template file")
    return text


def check_chat_template(tokenizer, template: str, source: str = "the chat template") -> None:
    """Render two messages once, so a broken template fails before any work."""
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                      tokenize=False, chat_template=template)
    except Exception as exc:  # jinja2 raises TemplateSyntaxError, UndefinedError, ...
        raise CBOPruneError(f"{source} does not render: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


@functools.cache
def _warn_no_template_once(name: str) -> None:
    log.warning("tokenizer %s has no chat template: chat records are joined as plain text (messages separated by "
                "blank lines); pass a chat template file (--chat-template FILE) to render them as the model "
                "expects", name or "(unnamed)")


def render_chat(tokenizer, messages: list[dict[str, str]], chat_template: str | None = None) -> str:
    """The messages rendered with `chat_template` or the tokenizer's template; without either,
    joined as plain text (warned once per tokenizer)."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
    _warn_no_template_once(str(getattr(tokenizer, "name_or_path", "")))
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
                      source: str, chat_template: str | None = None) -> CalibrationSet:
    """Tokenize records into at most `n_samples` samples of at most `seq_len` tokens.

    chat_template: Jinja text used instead of the tokenizer's template for chat records."""
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
        used, total = 0, len(chats)
        for messages in chats:
            used += 1
            text = render_chat(tokenizer, messages, chat_template)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:seq_len]
            if len(ids) >= MIN_SAMPLE_TOKENS:
                samples.append(ids)
            if len(samples) == n_samples:
                break
        kind = "chat"
        rendering = ("the given chat template" if chat_template else "the tokenizer's chat template"
                     if getattr(tokenizer, "chat_template", None) else
                     "plain text: no chat template, messages joined by blank lines")
    else:
        rng.shuffle(texts)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stream: list[int] = []
        used, total = 0, len(texts)
        for text in texts:
            used += 1
            stream += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
            if len(stream) >= n_samples * seq_len:
                break
        samples = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)][:n_samples]
        kind = "packed text"
        rendering = "plain text"
    if not samples:
        what = f"{MIN_SAMPLE_TOKENS} tokens" if kind == "chat" else f"one window of {seq_len} tokens"
        raise CBOPruneError(f"calibration data {source} is empty or too short: no sample reaches {what}. "
                            "Pass more data or a smaller --seq-len")
    if len(samples) < n_samples:
        log.warning("calibration data %s gave %d samples, fewer than the %d requested", source, len(samples), n_samples)
    ids, mask = pad_samples(samples, seq_len, pad_id)
    # The records read are the first `used` of the seeded shuffle: held-out domain records are
    # taken from its other end (cboprune.evaluation.domains), so they never overlap.
    return CalibrationSet(ids, mask, source=source, info={"kind": kind, "rendering": rendering, "seed": seed,
                                                          "records_used": used, "records_total": total})


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
                         prompts: list[dict[str, str]] | None = None,
                         chat_template: str | None = None) -> list[dict[str, Any]]:
    """The model answers the prompts (sampling with a fixed seed); returns chat records, cached."""
    prompts = prompts if prompts is not None else builtin_prompts()
    parts = [model_fingerprint(model), prompts, asdict(settings)] + ([chat_template] if chat_template else [])
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    template = chat_template or getattr(tokenizer, "chat_template", None)

    cache_file = cache_dir() / "calibration" / f"generated-{key}.jsonl"
    if cache_file.is_file():
        try:
            cached = [json.loads(line) for line in cache_file.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            cached = None
        if cached and all(isinstance(c, dict) for c in cached):
            return cached
        log.warning("generated calibration cache %s is damaged: generating again", cache_file)

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
            texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True,
                                                   chat_template=template)
                     if template else m[0]["content"] for m in messages]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                                 max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            for p, row in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
                answer = tokenizer.decode(row, skip_special_tokens=True).strip()
                records.append({"category": p.get("category", ""), "messages": [
                    {"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": answer}]})
    finally:
        tokenizer.padding_side = old_side
    with staged_file(cache_file) as stage:
        stage.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


# ----------------------------------------------------------------------------- entry point

def _looks_like_hub_dataset(spec: str) -> bool:
    return not spec.startswith((".", "/", "~")) and spec.count("/") <= 1 and not Path(spec).suffix


def check_data(data: str | None) -> int | None:
    """Validate a local calibration file without a model or tokenizer (readable, valid JSON, known
    record fields), so that a bad file fails before the model loads. Returns its record count, or
    None for generated data and hub dataset names (checked when loaded)."""
    if data in (None, "", GENERATED):
        return None

    if is_mix(data):
        check_mix(data)
        return None
    path = Path(data).expanduser()
    if not path.exists() and _looks_like_hub_dataset(data):
        return None
    records = read_records(path)
    records_to_messages(records, str(path))
    if not records:
        raise CBOPruneError(f"calibration data {path} holds no records: pass a non-empty file")
    return len(records)


def load_calibration(data: str | None, tokenizer, *, model=None, n_samples: int = 64, seq_len: int = 256,
                     seed: int = 0, generation: GenerationSettings | None = None,
                     split: str = "train", chat_template: str | Path | None = None) -> CalibrationSet:
    """Calibration samples from `data`: None / "generated" (the model answers built-in prompts),
    a local .jsonl/.json/.txt file, a hub dataset name (online only), or a weighted mix of files and
    `generated` (`a.json:0.7,b.txt:0.3`, `cboprune.data.mix`).

    chat_template: a template file (see `load_chat_template`) for tokenizers without one, or to
    override it. With `model`, a `seq_len` beyond its context is refused before any work.
    """
    if model is not None:
        check_seq_len(seq_len, model)
    template = None
    if chat_template is not None:
        template = load_chat_template(chat_template)
        check_chat_template(tokenizer, template, f"chat template {chat_template}")
    build = functools.partial(build_calibration, tokenizer=tokenizer, n_samples=n_samples, seq_len=seq_len,
                              seed=seed, chat_template=template)

    if is_mix(data):
        def one(source, n):
            spec = None if source.generated else source.spec
            return load_calibration(spec, tokenizer, model=model, n_samples=n, seq_len=seq_len, seed=seed,
                                    generation=generation, split=split, chat_template=chat_template)

        return load_mix(parse_mix(data), one, n_samples)
    if data in (None, "", GENERATED):
        if model is None:
            raise CBOPruneError("model-generated calibration needs the model: pass --data FILE instead")
        records = generate_calibration(model, tokenizer, generation or GenerationSettings(seed=seed),
                                       chat_template=template)
        return build(records, source=GENERATED)
    path = Path(data).expanduser()
    if path.exists() or not _looks_like_hub_dataset(data):
        return build(read_records(path), source=str(path))
    try:
        import datasets  # optional: only for hub dataset names
    except ImportError:
        raise CBOPruneError(f"{data!r} is not a local file and the `datasets` package is not installed "
                            "to fetch it from the hub: pass a local .jsonl/.json/.txt file") from None

    if not hub_reachable():
        raise CBOPruneError(f"calibration data {data!r}: the path does not exist and the hub is unreachable "
                            "(offline): pass a local .jsonl/.json/.txt file")
    try:
        ds = datasets.load_dataset(data, split=split)
    except Exception as exc:  # hub errors come in many types; the message is what matters
        raise CBOPruneError(f"cannot load dataset {data!r} from the hub ({type(exc).__name__}); offline? "
                            "pass a local .jsonl/.json/.txt file") from None
    return build(list(ds), source=f"hub:{data}:{split}")


# ----------------------------------------------------------------------------- a weighted mix of sources
# (`--data a.json:0.7,b.txt:0.3`; the grammar is cboprune.core.config's, the per-domain analysis cboprune.data.mix's)

def check_mix(data: str) -> list[MixSource]:
    """Parse the mix and read every file (valid JSON, known record fields, not empty), no model needed."""
    sources = parse_mix(data)
    for s in sources:
        if not s.generated:
            check_data(s.spec)
    return sources


def allocate(weights: list[float], n: int) -> list[int]:
    """Sample counts for `weights` summing to n: largest remainder, each source at least one."""
    if n < len(weights):
        raise CBOPruneError(f"a mix of {len(weights)} sources needs at least {len(weights)} samples, got {n}: "
                            "raise --n-samples")
    counts = [1] * len(weights)
    rest = n - len(weights)
    exact = [w * rest for w in weights]
    counts = [c + math.floor(e) for c, e in zip(counts, exact)]
    left = n - sum(counts)
    for i in sorted(range(len(weights)), key=lambda i: -(exact[i] - math.floor(exact[i])))[:left]:
        counts[i] += 1
    return counts


def interleave(counts: list[int]) -> list[tuple[int, int]]:
    """(source, k-th sample of it) in an order whose every prefix holds the sources in proportion:
    sample k of source i sits at (k + 1/2) / counts[i] of the way through."""
    slots = [((k + 0.5) / c, i, k) for i, c in enumerate(counts) for k in range(c)]
    return [(i, k) for _, i, k in sorted(slots)]


def load_mix(sources: list[MixSource], build_one, n_samples: int):
    """One CalibrationSet from the sources: `build_one(source, n)` builds n samples of one source
    (as `load_calibration` would for it alone)."""
    counts = allocate([s.weight for s in sources], n_samples)
    parts = [build_one(s, n) for s, n in zip(sources, counts)]
    width = max(p.input_ids.shape[1] for p in parts)
    if any(p.input_ids.shape[1] != width for p in parts):
        raise CBOPruneError("the sources of a mix gave samples of different lengths")  # never: all pad to seq_len
    order = [(i, k) for i, k in interleave([p.n_samples for p in parts])]
    ids = torch.stack([parts[i].input_ids[k] for i, k in order])
    mask = torch.stack([parts[i].attention_mask[k] for i, k in order])
    names = [s.name for s in sources]
    if len(set(names)) < len(names):  # two files with one stem: the full paths tell them apart
        names = [s.spec for s in sources]
    info: dict[str, Any] = {
        "kind": "mix", "seed": parts[0].info.get("seed"),
        "sources": [{"source": p.source, "name": name, "weight": round(s.weight, 6), "n_samples": p.n_samples,
                     "kind": p.info.get("kind"), **({"records_used": p.info["records_used"],
                                                     "records_total": p.info["records_total"]}
                                                    if "records_used" in p.info else {})}
                    for s, p, name in zip(sources, parts, names)],
        "domains": [names[i] for i, _ in order]}
    spec = ",".join(f"{s.spec}:{s.weight:g}" for s in sources)
    return CalibrationSet(ids, mask, source=f"mix({spec})", info=info)
