"""Energy models of CBO, one registration module each (see `cboprune.core.methods`).

Each module registers a `Method` of kind "energy" whose `select(context, remove)` returns the K
lowest states per M; the models themselves (`EnergyModel`, measured losses, re-linearization) are
in `cboprune.selection.energy`. To add an energy model: one module here and its test.
"""
