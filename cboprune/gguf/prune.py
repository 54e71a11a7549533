"""Remove blocks inside a GGUF file, quantization kept bit for bit.

    prune_gguf("model.Q4_1.gguf", [4, 5, 6, 7, 14, 16, 17, 18], "pruned.gguf", method="cbo hybrid")

The kept blocks' tensors are copied byte for byte (no de-quantization, no re-quantization) and
renamed `blk.<old>.* -> blk.<new>.*`; every other tensor is copied as it is. The metadata is copied
with its value types, except the depth-dependent keys that `layout.plan_metadata` rewrites
(`<arch>.block_count`, per-layer arrays, layer patterns llama.cpp derives from the index), and our
provenance is added under `cboprune.*`. Everything is checked (header, every tensor inside the file,
the architecture, the removal, the output path) before the output is staged; it is written next
to the target and renamed on success (`cboprune.core.outputs.staged_file`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cboprune.core.errors import CBOPruneError
from cboprune.gguf.layout import plan_metadata
from cboprune.models.loading import check_gguf
from cboprune.core.outputs import check_output_file, staged_file
from cboprune.core.version import __version__

log = logging.getLogger(__name__)

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
#: our own metadata namespace (llama.cpp ignores keys it does not read)
NAMESPACE = "cboprune"


@dataclass
class GGUFModel:
    """A GGUF file opened for reading (memory-mapped): its architecture, depth, metadata values."""

    path: Path
    reader: Any  # gguf.GGUFReader
    arch: str
    n_blocks: int
    values: dict[str, Any]  # key -> value (arrays as lists), the GGUF.* header fields left out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def field_value(field: Any) -> Any:
    """A reader field's value; arrays as lists, strings as str (bytes when not UTF-8)."""
    from gguf import GGUFValueType

    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [_text(bytes(field.parts[i])) for i in field.data]
        return [field.parts[i].tolist()[0] if len(field.parts[i]) == 1 else field.parts[i].tolist()
                for i in field.data]
    if main == GGUFValueType.STRING:
        return _text(bytes(field.parts[field.data[0]]))
    return field.parts[field.data[0]].tolist()[0]


def _text(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw  # written back as the same bytes


def read_gguf(path: str | Path) -> tuple[Path, Any, dict[str, Any]]:
    """(path, GGUFReader, metadata values) of any GGUF (a model, or a vocabulary-only file), after
    the magic, a header that parses and every tensor inside the file are checked. One line each."""
    from gguf import GGUFReader

    path = Path(path).expanduser()
    if not path.is_file():
        raise CBOPruneError(f"GGUF file not found: {path}. Check the path")
    check_gguf(path)
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # noqa: BLE001  (the reader raises ValueError, IndexError, ... on a damaged header)
        raise CBOPruneError(f"GGUF file {path} is corrupt or truncated ({_first_line(exc)}): re-download it") from None
    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CBOPruneError(f"GGUF file {path} is truncated: tensor {t.name} ends at byte {end} but the file has "
                                f"{size}; re-download it")
    values = {k: field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return path, reader, values


def open_gguf(path: str | Path) -> GGUFModel:
    """Open and check a GGUF model file (`read_gguf`, then `general.architecture`,
    `<arch>.block_count` and every block tensor's index). One-line errors."""
    path, reader, values = read_gguf(path)
    arch = values.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise CBOPruneError(f"GGUF file {path} has no general.architecture: it is not a model file")
    n_blocks = values.get(f"{arch}.block_count")
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise CBOPruneError(f"GGUF file {path} has no {arch}.block_count: cannot tell its depth")
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if m and int(m.group(1)) >= n_blocks:
            raise CBOPruneError(f"GGUF file {path}: tensor {t.name} belongs to block {m.group(1)} but "
                                f"{arch}.block_count is {n_blocks}; refusing an inconsistent file")
    return GGUFModel(path=path, reader=reader, arch=arch, n_blocks=n_blocks, values=values)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_removal(removed: Sequence[int], n_blocks: int) -> list[int]:
    """The removed blocks, sorted; negative indices count from the end. One line when invalid."""
    out = []
    for i in removed:
        j = i + n_blocks if i < 0 else i
        if not 0 <= j < n_blocks:
            raise CBOPruneError(f"block {i} does not exist: the model has {n_blocks} blocks (0..{n_blocks - 1})")
        out.append(j)
    if len(set(out)) != len(out):
        raise CBOPruneError(f"blocks {sorted(removed)} name a block twice")
    if not out:
        raise CBOPruneError("no block to remove: pass --blocks 3,7,12")
    if len(out) >= n_blocks:
        raise CBOPruneError(f"cannot remove all {n_blocks} blocks: keep at least one")
    return sorted(out)


@dataclass
class PrunePlan:
    source: GGUFModel
    removed: list[int]
    kept: list[int]
    metadata: dict[str, Any]  # depth-dependent keys to rewrite (None: delete)
    provenance: dict[str, Any]


def plan_prune(source: GGUFModel, removed: Sequence[int], provenance: dict[str, Any] | None = None) -> PrunePlan:
    """Everything the output needs, decided before anything is written (a removal the architecture's
    metadata cannot express is refused here)."""
    rm = check_removal(removed, source.n_blocks)
    kept = [i for i in range(source.n_blocks) if i not in set(rm)]
    meta = plan_metadata(source.arch, source.values, source.n_blocks, kept, source.path)
    return PrunePlan(source=source, removed=rm, kept=kept, metadata=meta, provenance=dict(provenance or {}))


def _provenance_fields(plan: PrunePlan) -> dict[str, tuple[Any, Any]]:
    """Our metadata: key -> (value, GGUF value type or (ARRAY, sub type))."""
    from gguf import GGUFValueType as T

    p = plan.provenance
    v = plan.source.values
    removed, n_source = plan.removed, plan.source.n_blocks
    source_file, source_sha = plan.source.path.name, p.get("source_sha256") or sha256_file(plan.source.path)
    earlier, n_first = v.get(f"{NAMESPACE}.removed_blocks"), v.get(f"{NAMESPACE}.source_block_count")
    if isinstance(earlier, list) and isinstance(n_first, int) and n_first - len(earlier) == n_source:
        # pruned again: the kept tensors are still the first source's bytes, so the record stays
        # about that file, the blocks removed counted in its indices
        kept_first = [i for i in range(n_first) if i not in set(earlier)]
        removed = sorted(set(earlier) | {kept_first[i] for i in plan.removed})
        n_source = n_first
        source_file = v.get(f"{NAMESPACE}.source_file", source_file)
        source_sha = v.get(f"{NAMESPACE}.source_sha256", source_sha)
    out: dict[str, tuple[Any, Any]] = {
        f"{NAMESPACE}.version": (__version__, T.STRING),
        f"{NAMESPACE}.removed_blocks": (removed, (T.ARRAY, T.UINT32)),
        f"{NAMESPACE}.source_block_count": (n_source, T.UINT32),
        f"{NAMESPACE}.source_file": (source_file, T.STRING),
        f"{NAMESPACE}.source_sha256": (source_sha, T.STRING),
    }
    if p.get("method"):
        out[f"{NAMESPACE}.method"] = (str(p["method"]), T.STRING)
    energy = p.get("energy")
    if isinstance(energy, (int, float)) and math.isfinite(energy):
        out[f"{NAMESPACE}.energy"] = (float(energy), T.FLOAT64)
    if p.get("state_rank") is not None:
        out[f"{NAMESPACE}.state_rank"] = (int(p["state_rank"]), T.UINT32)
    return out


def _copy_fields(writer: Any, plan: PrunePlan) -> None:
    """Every source key in its order and with its value types, rewritten where planned."""
    from gguf import GGUFValueType as T

    reader = plan.source.reader
    for key, field in reader.fields.items():
        if key.startswith(("GGUF.", f"{NAMESPACE}.")) or key == "general.architecture":
            continue  # the writer adds the header and the architecture; old provenance is replaced
        value = plan.metadata[key] if key in plan.metadata else plan.source.values[key]
        if value is None:
            continue
        main = field.types[0]
        if isinstance(value, list) and main != T.ARRAY:  # an integer period replaced by the explicit pattern
            writer.add_key_value(key, [bool(v) for v in value], T.ARRAY, sub_type=T.BOOL)
        elif main == T.ARRAY:
            writer.add_key_value(key, value, T.ARRAY, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, main)
    for key, value in plan.metadata.items():
        if key not in reader.fields and value is not None:  # a pattern written explicitly for the first time
            if isinstance(value, list):
                writer.add_key_value(key, [bool(v) for v in value], T.ARRAY, sub_type=T.BOOL)
            else:
                writer.add_key_value(key, int(value), T.UINT32)
    for key, (value, vtype) in _provenance_fields(plan).items():
        if isinstance(vtype, tuple):
            writer.add_key_value(key, value, vtype[0], sub_type=vtype[1])
        else:
            writer.add_key_value(key, value, vtype)


def renamed_tensors(plan: PrunePlan) -> list[tuple[str, Any]]:
    """(new name, source ReaderTensor) for every tensor the output keeps, in the source's order."""
    new_index = {old: new for new, old in enumerate(plan.kept)}
    out = []
    for t in plan.source.reader.tensors:
        m = _BLOCK.match(t.name)
        if m is None:
            out.append((t.name, t))
        elif int(m.group(1)) in new_index:
            out.append((f"blk.{new_index[int(m.group(1))]}.{m.group(2)}", t))
    return out


def _raw(reader: Any, tensor: Any) -> np.ndarray:
    """The tensor's bytes as stored, shaped [..., bytes per row] so the writer derives the same
    logical shape (`quant_shape_from_byte_shape`)."""
    start = int(tensor.data_offset)
    flat = reader.data[start:start + int(tensor.n_bytes)]
    logical = [int(d) for d in reversed(tensor.shape.tolist())]  # GGUF stores ne (fastest first)
    return np.asarray(flat, dtype=np.uint8).reshape(*logical[:-1], -1)


def write_gguf(plan: PrunePlan, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the planned GGUF atomically; returns the path."""
    from gguf import GGUFWriter

    out = Path(out).expanduser()
    source = plan.source
    with staged_file(out, overwrite=overwrite) as stage:
        writer = GGUFWriter(stage, source.arch)
        writer.data_alignment = int(source.reader.alignment)
        _copy_fields(writer, plan)
        for name, tensor in renamed_tensors(plan):
            writer.add_tensor(name, _raw(source.reader, tensor), raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def prune_gguf(source: str | Path | GGUFModel, removed: Sequence[int], out: str | Path, *,
               overwrite: bool = False, method: str | None = None, energy: float | None = None,
               state_rank: int | None = None) -> Path:
    """Remove blocks `removed` (original indices) from a GGUF file and write `out` (a GGUF of the
    same quantization, kept tensors byte-identical). Checks everything before writing."""
    out_path = check_output_file(out, overwrite)
    model = source if isinstance(source, GGUFModel) else open_gguf(source)
    if out_path.exists() and out_path.resolve() == model.path.resolve():
        raise CBOPruneError(f"output {out_path} is the source file: write the pruned model to another path")
    plan = plan_prune(model, removed, {"method": method, "energy": energy, "state_rank": state_rank})
    log.info("removing blocks %s of %d from %s (%s)", plan.removed, model.n_blocks, model.path, model.arch)
    return write_gguf(plan, out_path, overwrite=overwrite)


__all__ = [
    "NAMESPACE",
    "GGUFModel",
    "PrunePlan",
    "check_removal",
    "field_value",
    "open_gguf",
    "plan_prune",
    "prune_gguf",
    "read_gguf",
    "renamed_tensors",
    "sha256_file",
    "write_gguf",
]
