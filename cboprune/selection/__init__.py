"""What every selection method builds on: the Hessian pass, the energy models, and verification
of candidates by held-out loss."""
