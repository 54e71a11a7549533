"""The experiment engine: one session, select -> evaluate -> heal / repair -> resume, the one
skeleton of `compare` and `study`, and the short-heal judge of `run`."""
