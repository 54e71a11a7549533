"""Sliding-window merging (Ding et al. 2025): merged checkpoint instead of removal."""

from __future__ import annotations

from cboprune.core.errors import CBOPruneError
from cboprune.core.methods import PEER, Method, register


def _select(context, remove):
    from cboprune.baselines._swm import sliding_window_merging
    from cboprune.models.merging import DEFAULT_MERGE_RULE

    if context.keep:
        raise CBOPruneError("swm does not support --keep: drop it from the methods or from --keep")
    rule = context.options.get("swm_rule") or DEFAULT_MERGE_RULE
    return {m: sliding_window_merging(context.model, context.fit, m, threshold=context.options.get("swm_threshold"),
                                      rule=rule, batch_size=context.batch_size) for m in remove}


register(Method(
    name="swm", label="SWM", kind=PEER, order=80, ranked=False, min_kept=2,
    summary="merge similar adjacent blocks into one (merged checkpoint)",
    reference="Ding et al., sliding-window merging (2025)", needs=("forward",), select=_select,
    cost=lambda n, m, **_: 1.0, cost_formula="1", options=("swm_threshold", "swm_rule")))
