"""Block Influence (ShortGPT, Men et al. 2024): one shot, and recomputed after each removal (the
CBO paper's BI)."""

from __future__ import annotations

from cboprune.core.methods import PEER, Method, register

REFERENCE = "Men et al., ShortGPT (arXiv:2403.03853)"


def _one_shot(context, remove):
    from cboprune.baselines._similarity import block_influence

    return {m: block_influence(context.model, context.fit, m, stats=context.block_stats(), keep=context.keep,
                               top=context.top, batch_size=context.batch_size) for m in remove}


def _iterative(context, remove):
    from cboprune.baselines._similarity import block_influence_iterative
    from cboprune.core.ranking import prefix_ranking

    full = block_influence_iterative(context.model, context.fit, max(remove), first_stats=context.block_stats(),
                                     keep=context.keep, batch_size=context.batch_size)
    return {m: prefix_ranking(full, m, float(sum(full.info["step_scores"][:m]))) for m in remove}


register(Method(
    name="bi", label="BI one-shot", kind=PEER, order=10, summary="Block Influence 1 − cos(x_in, x_out), one shot",
    reference=REFERENCE, needs=("forward",), select=_one_shot, cost=lambda n, m, **_: 1.0, cost_formula="1"))

register(Method(
    name="bi-iter", label="BI iterative", kind=PEER, order=20, ranked=False,
    summary="Block Influence recomputed after each removal (as in the CBO paper)", reference=REFERENCE,
    needs=("forward",), select=_iterative, cost=lambda n, m, **_: float(m), cost_formula="M"))
