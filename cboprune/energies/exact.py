"""Second-order Taylor expansion with the exact gate Hessian (N Hessian-vector products)."""

from __future__ import annotations

from cboprune.core.methods import ENERGY, Method, register


def _select(context, remove):
    from cboprune.selection.energy import from_hessian

    model = from_hessian(context.exact_hessian(), "exact")
    context.energy_models["exact"] = model
    return {m: model.rank(m, context.top, **context.solve_options()) for m in remove}


register(Method(
    name="exact", label="CBO exact", kind=ENERGY, order=30,
    summary="second-order Taylor with the exact gate Hessian: −ḡᵀx + ½xᵀHx",
    needs=("gradients", "hessian-vector products"), select=_select,
    # a Hessian-vector product by double backward costs about one more gradient pass
    cost=lambda n, m, **_: 3.0 * (n + 1), cost_formula="3 (N + 1): the gradient pass and N HVPs",
    options=("exact_samples",)))
