"""Angular distance (Gromov et al. 2024): the best contiguous window by last-token angle."""

from __future__ import annotations

from cboprune.core.methods import PEER, Method, register


def _select(context, remove):
    from cboprune.baselines._similarity import angular_distance

    return {m: angular_distance(context.model, context.fit, m, stats=context.block_stats(), keep=context.keep,
                                top=context.top, batch_size=context.batch_size) for m in remove}


register(Method(
    name="angular", label="Angular distance", kind=PEER, order=30,
    summary="contiguous window with the smallest last-token angular distance",
    reference="Gromov et al., The unreasonable ineffectiveness of the deeper layers (arXiv:2403.17887)",
    needs=("forward",), select=_select, cost=lambda n, m, **_: 1.0, cost_formula="1"))
