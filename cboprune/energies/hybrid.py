"""Measured single removals, Fisher interactions: the cheap energy of the default selection.

The paper's Fisher energy mispredicts what matters most, the loss of removing each block alone
(docs/study.md: it is a second-order guess of a step of size one), while the measured energy pays
N(N−1)/2 forward configurations for the pairs. `hybrid` measures only the N single removals, on a
subset of the fitting samples, and takes the pair interactions from the Fisher matrix of the one
gradient pass:

    E(x) = Σ_i d_i x_i + ½ Σ_{i≠j} F_ij x_i x_j,   d_i = L(−i) − L₀ (measured),  F = AᵀA/m

so every single removal is exact (on the subset) and pairs are the fisher-linear model's.

With `run_cost` r > 0 (default RUN_COST = 0.5) the energy also charges r × (the median
single-removal increase) for every contiguous run of removed blocks, and verification adds the
same charge to the measured held-out loss: among states of equal loss before healing, fewer and
longer gaps heal better
(docs/study.md, "Fewer gaps heal better").
Cost: 3 (the gradient pass) + N · s/m forward passes (s: `single_samples` of the m fitting samples).

**Re-centring** (`recentre` rounds, default RECENTRE_ROUNDS = 1): after verification, the energy is
expanded again around the verified pick x₀ instead of around the full model. The N flips of x₀
(restore one removed block, or remove one more) are measured on half of the singles' s samples, and with
Δ = x − x₀ (Δ_i = +1: one more block removed, −1: one restored)

    E₀(x) = Σ_i g_i Δ_i + ½ Σ_{i≠j} F_ij Δ_i Δ_j  (+ the run cost),   g_i Δ_i = L(x₀ with i flipped) − L(x₀)

is exact on every state one flip from x₀, where the loss is steepest: at M = 12 on the default model the
full-model expansion misses states whose blocks interact (late blocks that are cheap only once middle
ones are gone). Its K/2 lowest states are verified like the first ones and the better of all is the new
x₀. Cost per round and M: N · s'/m + K/2 · h/m (s' = s/2, at least 4; h held-out samples). Halving both
kept the default within 20 forward passes for M = 8 and 12 with the same picks on the default model at
`run`'s sizes; on 4 short samples the flips can miss a state (docs/study.md, "Within the budget").
"""

from __future__ import annotations

from dataclasses import replace

from cboprune.core.methods import ENERGY, Method, register

#: default fraction of the fitting samples the single removals are measured on (at least 8 samples):
#: an eighth, to stay within 20 forward passes for M = 8 and 12 (docs/study.md)
SINGLE_FRACTION = 0.125
#: default charge per contiguous run of removed blocks, in median single-removal increases
#: (docs/study.md, "Fewer gaps heal better": at 0.5 the default picks the best state after healing
#: at M = 8 and 12 on the default model; 0 is the plain hybrid energy)
RUN_COST = 0.5
#: default rounds of re-centring the energy at the verified pick (docs/study.md, "Re-centring at the
#: verified pick": one round finds, at M = 12, a state better before healing than SLEB's; 0: off)
RECENTRE_ROUNDS = 1
#: the re-centring's flips are measured on this share of the singles' samples (at least 4), and it
#: verifies at most this share of K new states: the default selection's budget of 20 forward passes
#: for M = 8 and 12 (docs/study.md, "Within the budget": 18.3 passes, and the same picks on the default
#: model as with every sample and K new states, measured)
RECENTRE_SAMPLE_FRACTION = 0.5
RECENTRE_STATE_FRACTION = 0.5


def single_samples(n_fit: int, requested: int | None = None) -> int:
    return max(1, min(n_fit, requested or max(8, round(SINGLE_FRACTION * n_fit))))


def single_fraction(n_fit: int, requested: int | None = None) -> float:
    """The share of the fitting samples the single removals are measured on (for the cost model)."""
    return single_samples(n_fit, requested) / n_fit


def recentre_samples(s: int) -> int:
    """The samples the re-centring's flips are measured on, of the singles' `s`."""
    return min(s, max(4, round(RECENTRE_SAMPLE_FRACTION * s)))


def recentre_states(k: int) -> int:
    """The re-centred energy's lowest states listed (and, those not yet verified, verified), of K."""
    return max(1, round(RECENTRE_STATE_FRACTION * k))


def singles_subset(context, s: int):
    """The first `s` fitting samples: where the single removals (and the re-centring's flips) are measured."""
    return context.fit if s >= context.fit.n_samples else context.fit.split(s)[0]


def hybrid_energy(context):
    """The EnergyModel (measured singles on the first `single_samples` fitting samples)."""
    import numpy as np

    from cboprune.selection.energy import EnergyModel, with_run_cost
    from cboprune.models.masked import configurations_nll

    hessian = context.hessian()
    n = hessian.n_blocks
    s = single_samples(context.fit.n_samples, context.options.get("single_samples"))
    subset = singles_subset(context, s)
    allowed = set(range(n) if context.removable is None else context.removable) - set(context.keep)
    todo = sorted(allowed)
    base, *single = configurations_nll(context.model, subset, [()] + [(i,) for i in todo],
                                       batch_size=context.batch_size)
    d = np.full(n, np.inf)
    d[todo] = np.asarray(single) - base
    F = hessian.matrix("fisher")
    Q = 0.5 * F
    np.fill_diagonal(Q, 0.0)
    linear = np.where(np.isfinite(d), d, 0.0)
    model = EnergyModel("hybrid", Q, linear, removable=todo if len(todo) < n else None,
                        info={"single_samples": s, "base_nll": float(base), "single_delta": d.tolist(),
                              "configurations": 1 + len(todo), "hessian": hessian.fingerprint})
    run_cost = context.options.get("run_cost")
    run_cost = RUN_COST if run_cost is None else run_cost
    if run_cost:
        # In units of a typical block: the median loss increase of removing one removable block alone.
        model = with_run_cost(model, run_cost * float(np.median(d[todo])))
        model.info["run_cost"] = run_cost
    return model


def recentred_energy(context, base, state) -> tuple[object, float]:
    """The hybrid energy re-expanded at `state` (see the module docstring), and the loss of `state` on
    the singles' subset; `base` is the full-model hybrid EnergyModel (its run cost is kept)."""
    import numpy as np

    from cboprune.models.masked import configurations_nll
    from cboprune.selection.energy import EnergyModel, with_run_cost

    n = base.n_blocks
    subset = singles_subset(context, recentre_samples(base.info["single_samples"]))
    allowed = set(range(n) if base.removable is None else base.removable)
    state = tuple(sorted(state))
    inside = set(state)
    flips = sorted(inside | allowed)
    configs = [tuple(sorted(inside ^ {i})) for i in flips]
    at, *flipped = configurations_nll(context.model, subset, [state] + configs, batch_size=context.batch_size)
    x = np.zeros(n)
    x[list(state)] = 1.0
    sign = 1.0 - 2.0 * x  # Δ_i = +1 removes a kept block, −1 restores a removed one
    g = np.zeros(n)
    for i, v in zip(flips, flipped):
        g[i] = (v - at) * sign[i]  # the loss change per unit of x_i
    F = context.hessian().matrix("fisher").copy()
    np.fill_diagonal(F, 0.0)
    # E(x) = gᵀ(x − x₀) + ½ (x − x₀)ᵀF(x − x₀) = ½ xᵀFx + (g − F x₀)ᵀx + const
    model = EnergyModel("hybrid", 0.5 * F, g - F @ x, removable=base.removable,
                        info={**base.info, "recentred_at": list(state), "recentre_configurations": len(configs) + 1,
                              "fit_fraction": subset.n_tokens / context.fit.n_tokens})
    cost = base.info.get("run_cost_nats")
    return (with_run_cost(model, cost) if cost else model), float(at)


def _recentre(context, verified):
    """`recentre` rounds of re-centring from the verified pick (module docstring): the verified
    ranking with the re-centred energy's verified states merged in, best first."""
    from cboprune.selection.verify import merge_verified, verify

    rounds = context.options.get("recentre")
    rounds = RECENTRE_ROUNDS if rounds is None else rounds
    base = context.energy_models.get("hybrid")
    if not rounds or base is None:
        return verified
    m, path = verified.n_remove, [list(verified.best.removed)]
    configurations = checked_states = 0
    fit_fraction = 0.0
    for _ in range(rounds):
        start = verified.best.removed
        local, _ = recentred_energy(context, base, start)
        configurations += local.info["recentre_configurations"]
        fit_fraction = local.info["fit_fraction"]
        listed = local.rank(m, recentre_states(len(verified.candidates)), **context.solve_options())
        known = {c.removed for c in verified.candidates}
        new = [c for c in listed.candidates if c.removed not in known]
        if not new:
            break
        # Scored by the full-model energy, so that one energy column (and its Spearman) covers all states.
        listed.candidates = [replace(c, score=base.energy(c.removed)) for c in new]
        checked = verify(context.model, context.heldout, listed, batch_size=context.batch_size)
        checked_states += len(new)
        verified = merge_verified(verified, checked, len(verified.candidates))
        if verified.best.removed == start:
            break
        path.append(list(verified.best.removed))
    # for the cost model: flips on the singles' subset (its share of the fitting tokens), new states held out
    verified.info["recentre"] = {"rounds": rounds, "path": path, "configurations": configurations,
                                 "single_samples": recentre_samples(base.info["single_samples"]),
                                 "fit_fraction": fit_fraction,
                                 "verified_states": checked_states}
    return verified


def _select(context, remove):
    model = hybrid_energy(context)
    context.energy_models["hybrid"] = model
    return {m: model.rank(m, context.top, **context.solve_options()) for m in remove}


def _cost(n: int, m: int, single_fraction: float = SINGLE_FRACTION, **_) -> float:
    return 3.0 + (1 + n) * single_fraction


register(Method(
    name="hybrid", label="CBO hybrid", kind=ENERGY, order=45,
    summary="measured single removals (on a subset) + Fisher pair interactions",
    needs=("gradients", "forward configurations"), select=_select, cost=_cost, after_verify=_recentre,
    cost_formula="3 + (N + 1)·s/m (s of the m fitting samples, default m/8, at least 8)", options=("single_samples", "run_cost", "recentre"),
    scheme=f"recentre flips {RECENTRE_SAMPLE_FRACTION} states {RECENTRE_STATE_FRACTION}"))
