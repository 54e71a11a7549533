"""SLEB (Song et al. 2024): greedy removal by calibration perplexity, re-scored after each step."""

from __future__ import annotations

from cboprune.core.methods import PEER, Method, register


def _select(context, remove):
    from cboprune.baselines._loss_based import sleb
    from cboprune.core.ranking import prefix_ranking

    full = sleb(context.model, context.fit, max(remove), first_step=context.single_removal_nll(), keep=context.keep,
                batch_size=context.batch_size)
    return {m: prefix_ranking(full, m, full.info["step_ppl"][m - 1]) for m in remove}


register(Method(
    name="sleb", label="SLEB", kind=PEER, order=50, ranked=False,
    summary="greedy removal by calibration perplexity", reference="Song et al., SLEB (arXiv:2402.09025)",
    needs=("forward configurations",), select=_select,
    cost=lambda n, m, **_: float(m * n - m * (m - 1) // 2), cost_formula="MN − M(M−1)/2"))
