"""Measured single and pair removal losses: exact up to pairs, interactions beyond neglected."""

from __future__ import annotations

from cboprune.core.methods import ENERGY, Method, register


def _select(context, remove):
    from cboprune.selection.energy import measure_losses

    model = measure_losses(context.model, context.fit, pool_size=context.options.get("pool"), keep=context.keep,
                           removable=context.removable, batch_size=context.batch_size).energy_model()
    context.energy_models["measured"] = model
    return {m: model.rank(m, context.top, **context.solve_options()) for m in remove}


def _cost(n: int, m: int, pool: int | None = None, **_) -> float:
    p = pool or n
    return 1.0 + n + p * (p - 1) / 2


register(Method(
    name="measured", label="CBO measured", kind=ENERGY, order=40,
    summary="measured single and pair removal losses (exact up to pairs)", needs=("forward configurations",),
    select=_select, cost=_cost, cost_formula="1 + N + P(P−1)/2 (P: --pool, default N)", options=("pool",)))
