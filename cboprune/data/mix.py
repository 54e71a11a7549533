"""Calibration as a weighted mix of sources: `--data a.json:0.7,b.txt:0.3`.

A source is a local .jsonl/.json/.txt file or `generated` (the built-in prompts answered by the
model). Each source gives round(weight x n) of the n samples requested (largest remainder, every
source at least one), built exactly as that file alone would be (chat records rendered, text
packed, the same seed), and the samples are interleaved so that every prefix holds the sources in
their proportions: the fitting part and the held-out part of `CalibrationSet.split` are then both
drawn from every domain. `info["domains"]` names the source of each sample (sliced by `split`),
which is what `domain_losses` scores per domain.

Parsing and checking need no model: a bad weight, a missing file, an empty mix or a duplicate
source is one `CBOPruneError` line before anything loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cboprune.errors import CBOPruneError

GENERATED_NAMES = ("generated", "builtin")


@dataclass(frozen=True)
class MixSource:
    spec: str  # a file path or "generated"
    weight: float  # normalized: the weights of a mix sum to 1

    @property
    def generated(self) -> bool:
        return self.spec in GENERATED_NAMES

    @property
    def name(self) -> str:
        """A short domain name: the file's stem, or `generated`."""
        return "generated" if self.generated else Path(self.spec).stem


def is_mix(data: str | None) -> bool:
    """Whether `data` is a mix spec (a comma, or a `:weight` suffix) rather than one path or name."""
    if not data:
        return False
    if "," in data:
        return True
    head, sep, tail = data.rpartition(":")
    return bool(sep and head) and _number(tail) is not None and not Path(data).exists()


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_mix(data: str) -> list[MixSource]:
    """The sources of a mix spec, weights normalized; every problem in one line."""
    parts = [p.strip() for p in data.split(",")]
    if not any(parts):
        raise CBOPruneError(f"--data {data!r} is an empty mix: pass sources with weights, e.g. "
                            "--data a.json:0.7,b.txt:0.3")
    problems, sources = [], []
    for part in parts:
        if not part:
            problems.append("an empty entry (two commas, or a trailing one)")
            continue
        spec, sep, weight_text = part.rpartition(":")
        weight = _number(weight_text) if sep else None
        if not sep or not spec:
            problems.append(f"{part!r} has no weight (write {part}:0.5)")
            continue
        if weight is None or not math.isfinite(weight) or weight <= 0:
            problems.append(f"{part!r}: the weight {weight_text!r} is not a positive number")
            continue
        spec = "generated" if spec in GENERATED_NAMES else spec
        if spec != "generated":
            path = Path(spec).expanduser()
            if not path.is_file():
                problems.append(f"{spec} is not a file (a mix takes local .jsonl/.json/.txt files and 'generated')")
                continue
            spec = str(path)
        if any(s.spec == spec for s in sources):
            problems.append(f"{spec} is listed twice")
            continue
        sources.append(MixSource(spec, weight))
    if problems:
        raise CBOPruneError(f"--data {data!r}: " + "; ".join(problems))
    total = sum(s.weight for s in sources)
    return [MixSource(s.spec, s.weight / total) for s in sources]


def check_mix(data: str) -> list[MixSource]:
    """Parse the mix and read every file (valid JSON, known record fields, not empty), no model needed."""
    from cboprune.data.calibration import check_data

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
    import torch

    from cboprune.data.calibration import CalibrationSet

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


def sample_domains(calibration) -> list[str] | None:
    """The source name of each sample of a (split part of a) mix, None for a single source."""
    names = calibration.info.get("domains")
    if names is None:
        return None
    lo, hi = calibration.info.get("samples", [0, len(names)])
    return list(names[lo:hi])


def by_domain(calibration):
    """{domain: the samples of that domain} of a (split part of a) mixed set, in first-seen order;
    None for a single source."""
    from cboprune.data.calibration import CalibrationSet

    names = sample_domains(calibration)
    if names is None:
        return None
    parts = {}
    for name in dict.fromkeys(names):
        rows = [r for r, n in enumerate(names) if n == name]
        parts[name] = CalibrationSet(calibration.input_ids[rows], calibration.attention_mask[rows], calibration.source,
                                     {"domain": name})
    return parts


def target_tokens(calibration) -> int:
    """Positions with a next-token target: the weights of a token-weighted mean NLL."""
    return int(calibration.attention_mask[:, 1:].sum())


def domain_losses(model, calibration, *, batch_size: int = 8, removed=()) -> dict[str, float] | None:
    """Token-weighted mean NLL (as `calibration_nll`) on each domain of a mixed calibration set, with
    `removed` switched off (None when it is not a mix): the verification's one number taken apart,
    so that a report can show the worst domain beside the mean."""
    from cboprune.masked import calibration_nll

    parts = by_domain(calibration)
    if parts is None:
        return None
    return {name: calibration_nll(model, part, batch_size=batch_size, removed=removed) for name, part in parts.items()}
