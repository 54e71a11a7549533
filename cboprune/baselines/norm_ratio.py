"""Norm ratio (Ministral 3, Mistral AI 2026): block output/input norm ratio."""

from __future__ import annotations

from cboprune.core.methods import PEER, Method, register


def _select(context, remove):
    from cboprune.baselines._similarity import norm_ratio

    return {m: norm_ratio(context.model, context.fit, m, stats=context.block_stats(), keep=context.keep,
                          top=context.top, batch_size=context.batch_size) for m in remove}


register(Method(
    name="norm-ratio", label="Norm ratio", kind=PEER, order=40, summary="block output/input norm ratio",
    reference="Mistral AI, Ministral 3", needs=("forward",), select=_select, cost=lambda n, m, **_: 1.0,
    cost_formula="1"))
