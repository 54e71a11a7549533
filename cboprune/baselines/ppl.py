"""PPL (Kim et al. 2024, Shortened LLaMA): calibration perplexity with one block removed, one shot."""

from __future__ import annotations

from cboprune.core.methods import PEER, Method, register


def _select(context, remove):
    from cboprune.baselines._loss_based import perplexity_criterion

    return {m: perplexity_criterion(context.model, context.fit, m, single_nll=context.single_removal_nll(),
                                    keep=context.keep, top=context.top, batch_size=context.batch_size)
            for m in remove}


register(Method(
    name="ppl", label="PPL", kind=PEER, order=60, summary="calibration perplexity with the block removed",
    reference="Kim et al., Shortened LLaMA (arXiv:2402.02834)", needs=("forward configurations",),
    select=_select, cost=lambda n, m, **_: float(n), cost_formula="N"))
