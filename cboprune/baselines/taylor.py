"""Taylor+ (Kim et al. 2024, Shortened LLaMA): first-order weight saliency, first 4 / last 2 kept."""

from __future__ import annotations

from cboprune.core.methods import PEER, Method, register


def _select(context, remove):
    from cboprune.baselines._loss_based import taylor_plus, taylor_scores

    scores = context.cached("taylor", lambda: taylor_scores(context.model, context.fit,
                                                            batch_size=context.batch_size))
    return {m: taylor_plus(context.model, context.fit, m, scores=scores, keep=context.keep, top=context.top,
                           batch_size=context.batch_size) for m in remove}


register(Method(
    name="taylor", label="Taylor+", kind=PEER, order=70, summary="Σ|w·∂L/∂w| over the block's weights",
    reference="Kim et al., Shortened LLaMA (arXiv:2402.02834)", needs=("gradients",), select=_select,
    cost=lambda n, m, **_: 3.0, cost_formula="3 (one gradient pass)"))
