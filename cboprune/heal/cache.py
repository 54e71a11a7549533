"""Teacher outputs computed once and reused by every student healed on the same data.

For each sample the cache keeps, per position, the teacher's top-k token ids and their log-
probabilities at the distillation temperature T, the log of the remaining (tail) mass, and the
teacher's log-probability of the actual next token at T = 1 (for the teacher's held-out
cross-entropy). Shards are safetensors files; `meta.json` records the fingerprint of what they were
computed from (the teacher's files, the tokenized samples, seq_len, k, T). A cache directory whose
fingerprint differs from the run's is refused, never silently reused.

The approximation: with a cache the KL is taken between teacher and student coarsened to k + 1
bins (the teacher's top k and "the rest"), see `cboprune.heal.loss.SparseTeacher`. It is exact when
the teacher's tail mass is 0 and a lower bound of the full KL otherwise; its effect on healing is
measured in docs/healing.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cboprune.core.errors import CBOPruneError
from cboprune.heal.data import TokenizedSet
from cboprune.heal.loss import SparseTeacher
from cboprune.models.loading import resolve_model_source
from cboprune.core.outputs import staged_file, write_json

log = logging.getLogger(__name__)

META_FILE = "meta.json"
_PROBE = 1 << 20  # bytes hashed at each end of a weight file


def _hash_file_ends(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        h.update(f.read(_PROBE))
        if size > 2 * _PROBE:
            f.seek(size - _PROBE)
            h.update(f.read(_PROBE))


def teacher_fingerprint(teacher: str) -> str:
    """A cheap identity of the teacher's files: config and weight file names, sizes, first and last MiB."""

    source, local_dir = resolve_model_source(teacher)
    h = hashlib.sha256()
    if local_dir is None:
        h.update(f"hub:{source}".encode())
        return h.hexdigest()[:16]
    root = Path(local_dir)
    files = sorted(p for p in root.iterdir() if p.name == "config.json"
                   or p.suffix in (".safetensors", ".bin", ".gguf"))
    for path in files:
        _hash_file_ends(path, h)
    return h.hexdigest()[:16]


def data_fingerprint(*sets: TokenizedSet) -> str:
    h = hashlib.sha256()
    for data in sets:
        for t in (data.input_ids, data.attention_mask, data.loss_mask):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


class TeacherCache:
    """Cached teacher outputs for the samples of a training and a held-out set.

    Typical use, one teacher for many students (the teacher is loaded only while rows are missing):

        cache = TeacherCache.for_run(path, teacher_spec, train, held, top_k=64, temperature=1.0)
        heal(HealConfig(..., teacher_cache=path))  # or cache.fill(teacher_model, ...) yourself

    Samples are addressed by (split, row) with split "train" or "heldout".
    """

    def __init__(self, root: str | Path, fingerprint: str, meta: dict):
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.meta = meta
        self.top_k = int(meta["top_k"])
        self.temperature = float(meta["temperature"])
        self._where: dict[tuple[str, int], tuple[Path, int]] = {}
        self.teacher_passes = 0  # samples this object ran through the teacher
        self._scan()

    @classmethod
    def for_run(cls, root: str | Path, teacher: str, train: TokenizedSet, held: TokenizedSet, *,
                top_k: int = 64, temperature: float = 1.0) -> TeacherCache:
        if top_k < 1:
            raise CBOPruneError(f"teacher cache top_k must be >= 1, got {top_k}")
        meta = {"teacher": teacher, "teacher_files": teacher_fingerprint(teacher),
                "data": data_fingerprint(train, held), "seq_len": int(train.input_ids.shape[1]),
                "top_k": int(top_k), "temperature": float(temperature)}
        fingerprint = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "teacher"},
                                                sort_keys=True).encode()).hexdigest()[:16]
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise CBOPruneError(f"teacher cache {root} is a file: pass a directory")
        meta_path = root / META_FILE
        if meta_path.is_file():
            try:
                stored = json.loads(meta_path.read_text(encoding="utf-8"))["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError):
                raise CBOPruneError(f"teacher cache {meta_path} is malformed: delete {root}") from None
            if stored != fingerprint:
                raise CBOPruneError(f"teacher cache {root} was computed for another teacher, data, seq_len, top-k or "
                                    "temperature: pass a new directory or delete it")
        elif root.is_dir() and any(root.iterdir()):
            raise CBOPruneError(f"teacher cache directory {root} is not empty and has no {META_FILE}: pass a new "
                                "directory")
        else:
            write_json(meta_path, {**meta, "fingerprint": fingerprint})
        return cls(root, fingerprint, meta)

    def _scan(self) -> None:
        for shard in sorted(self.root.glob("shard-*.safetensors")):
            try:
                with safe_open(shard, framework="pt") as f:
                    info = f.metadata() or {}
                    rows = f.get_tensor("rows").tolist()
            except (SafetensorError, OSError, ValueError, RuntimeError):
                raise CBOPruneError(f"teacher cache shard {shard} is unreadable: delete it (it is recomputed)") \
                    from None
            if info.get("fingerprint") != self.fingerprint:
                raise CBOPruneError(f"teacher cache shard {shard} belongs to another cache: delete it")
            for pos, row in enumerate(rows):
                self._where[(info["split"], int(row))] = (shard, pos)

    def missing(self, split: str, rows: Iterable[int]) -> list[int]:
        return sorted({int(r) for r in rows if (split, int(r)) not in self._where})

    @torch.no_grad()
    def fill(self, teacher, data: TokenizedSet, split: str, rows: Iterable[int], *, batch_size: int = 8,
             shard_rows: int = 256) -> int:
        """Run the teacher over the missing rows of `data` and write them as shards; returns their number."""
        todo = self.missing(split, rows)
        device = next(teacher.parameters()).device
        for lo in range(0, len(todo), shard_rows):
            chunk = todo[lo:lo + shard_rows]
            parts = [self._teacher_rows(teacher, data, chunk[i:i + batch_size], device)
                     for i in range(0, len(chunk), batch_size)]
            tensors = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            tensors["rows"] = torch.tensor(chunk, dtype=torch.int64)
            name = f"shard-{split}-{len(list(self.root.glob('shard-*.safetensors'))):05d}.safetensors"
            with staged_file(self.root / name) as stage:
                save_file(tensors, stage, metadata={"fingerprint": self.fingerprint, "split": split})
            for pos, row in enumerate(chunk):
                self._where[(split, row)] = (self.root / name, pos)
            self.teacher_passes += len(chunk)
        return len(todo)

    def _teacher_rows(self, teacher, data: TokenizedSet, rows: list[int], device) -> dict[str, torch.Tensor]:
        full = data.input_ids.shape[1]
        width = int(data.attention_mask[rows].sum(1).max())  # right padding: trim, run, pad back
        ids = data.input_ids[rows, :width].to(device)
        mask = data.attention_mask[rows, :width].to(device)
        logits = teacher(input_ids=ids, attention_mask=mask).logits.float()  # [b, w, V]
        log_p = torch.log_softmax(logits / self.temperature, dim=-1)
        top = log_p.topk(min(self.top_k, log_p.shape[-1]), dim=-1)
        tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1.0))  # -inf when the top k hold everything
        log_p1 = log_p if self.temperature == 1.0 else torch.log_softmax(logits, dim=-1)
        nxt = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)
        target = log_p1.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)  # position t: log p(token t+1)
        pad = full - width
        out = {"indices": top.indices.to(torch.int32), "logprobs": top.values, "target_logprob": target}
        out = {k: torch.nn.functional.pad(v, (0, 0, 0, pad) if v.dim() == 3 else (0, pad)).cpu()
               for k, v in out.items()}
        out["tail_logprob"] = torch.nn.functional.pad(tail, (0, pad), value=float("-inf")).cpu()
        return out

    def lookup(self, split: str, rows: Iterable[int], width: int) -> tuple[SparseTeacher, torch.Tensor]:
        """(SparseTeacher [b, width, k], target log-probs at T = 1 [b, width]) for the given rows."""
        out: dict[str, list[torch.Tensor]] = {k: [] for k in ("indices", "logprobs", "tail_logprob",
                                                               "target_logprob")}
        for row in rows:
            key = (split, int(row))
            if key not in self._where:
                raise CBOPruneError(f"teacher cache {self.root} has no {split} sample {int(row)}: fill it first")
            shard, pos = self._where[key]
            with safe_open(shard, framework="pt") as f:
                for name, parts in out.items():
                    parts.append(f.get_slice(name)[pos:pos + 1, :width])
        t = {k: torch.cat(v) for k, v in out.items()}
        return SparseTeacher(t["indices"], t["logprobs"], t["tail_logprob"]), t["target_logprob"]
