"""Calibration as a weighted mix of sources: `--data a.json:0.7,b.txt:0.3`.

A source is a local .jsonl/.json/.txt file or `generated` (the built-in prompts answered by the
model). Each source gives round(weight x n) of the n samples requested (largest remainder, every
source at least one), built exactly as that file alone would be (chat records rendered, text
packed, the same seed), and the samples are interleaved so that every prefix holds the sources in
their proportions: the fitting part and the held-out part of `CalibrationSet.split` are then both
drawn from every domain. `info["domains"]` names the source of each sample (sliced by `split`),
which is what `cboprune.selection.verify.domain_losses` scores per domain.

Parsing and checking need no model: a bad weight, a missing file, an empty mix or a duplicate
source is one `CBOPruneError` line before anything loads.
"""

from __future__ import annotations

from cboprune.core.choices import GENERATED_NAMES, MixSource, is_mix, parse_mix
from cboprune.data.calibration import CalibrationSet, allocate, check_mix, interleave, load_mix

# the grammar (cboprune.core.config) and the builders (cboprune.data.calibration), named here as well
__all__ = ["GENERATED_NAMES", "MixSource", "allocate", "by_domain", "check_mix", "interleave",
           "is_mix", "load_mix", "parse_mix", "sample_domains", "target_tokens"]

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
