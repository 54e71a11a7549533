"""The paper's energy xᵀ(AᵀA/m)x, and its second-order Taylor form with the first-order term."""

from __future__ import annotations

from cboprune.core.methods import ENERGY, Method, register


def _rank_from_hessian(name: str):
    def select(context, remove):
        from cboprune.selection.energy import from_hessian

        model = from_hessian(context.hessian(), name)
        context.energy_models[name] = model
        return {m: model.rank(m, context.top, **context.solve_options()) for m in remove}
    return select


register(Method(
    name="fisher", label="CBO fisher (paper)", kind=ENERGY, order=10,
    summary="xᵀ(AᵀA/m)x from per-sample gate gradients",
    reference="Jansen et al., block removal through CBO", needs=("gradients",),
    select=_rank_from_hessian("fisher"), cost=lambda n, m, **_: 3.0, cost_formula="3 (one gradient pass)"))

register(Method(
    name="fisher-linear", label="CBO fisher-linear", kind=ENERGY, order=20,
    summary="second-order Taylor with the Fisher: −ḡᵀx + ½xᵀ(AᵀA/m)x", needs=("gradients",),
    select=_rank_from_hessian("fisher-linear"), cost=lambda n, m, **_: 3.0, cost_formula="3 (one gradient pass)"))
