"""Configurations: a candidate's removed blocks and merged groups, with the merge rule. Two entries with
equal keys give the same pruned model, so the engine evaluates, heals and repairs it once."""

from __future__ import annotations

from typing import Any

from cboprune.core.choices import DEFAULT_MERGE_RULE
from cboprune.core.ranking import Candidate, Entry


def configuration_key(candidate: Candidate, merge_rule: str | None) -> tuple:
    """Configurations with equal keys give the same pruned model (evaluated once)."""
    return candidate.removed, candidate.merged, merge_rule if candidate.merged else None


def configuration_fields(candidate: Candidate, merge_rule: str | None) -> dict[str, Any]:
    """`configuration_key` as JSON fields, for the fingerprints of kept results."""
    removed, merged, rule = configuration_key(candidate, merge_rule)
    return {"removed": list(removed), "merged": [list(g) for g in merged], "rule": rule}


def merge_rule_of(entry: Entry) -> str:
    """The merge rule a ranking's merged candidates were made with (the default one when unset)."""
    return entry.ranking.info.get("merge_rule", DEFAULT_MERGE_RULE)
