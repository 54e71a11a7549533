"""fisher-linear re-expanded at the current point after every `relin_step` removals."""

from __future__ import annotations

import math

from cboprune.core.methods import ENERGY, Method, register


def _select(context, remove):
    from cboprune.selection.energy import relinearized_rankings

    return relinearized_rankings(context.model, context.fit, remove, context.top,
                                 step=context.options.get("relin_step") or 4, first=context.hessian(),
                                 batch_size=context.batch_size, progress=context.progress,
                                 **context.solve_options())


register(Method(
    name="relinearized", label="CBO relinearized", kind=ENERGY, order=50,
    summary="fisher-linear re-expanded at the current point every few removals", needs=("gradients",),
    select=_select, cost=lambda n, m, relin_step=4, **_: 3.0 * math.ceil(m / (relin_step or 4)),
    cost_formula="3 ⌈M / step⌉ gradient passes", options=("relin_step",)))
