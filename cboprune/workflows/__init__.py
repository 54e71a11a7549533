"""The jobs users run: `run` (and `hessian`), `compare`, `study` and the domain study."""
