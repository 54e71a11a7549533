"""Shared machinery of the peer criteria: a top-M ranking for per-block (additive) scores. Block
input/output statistics live in `cboprune.models.block_stats`, losses with blocks switched off in
`cboprune.models.masked`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

from cboprune.core.errors import CBOPruneError
from cboprune.core.ranking import Candidate, Ranking, check_n_remove

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- rankings

def top_m_ranking(method: str, scores: Sequence[float], n_remove: int, top: int = 1, *,
                  keep: Iterable[int] = (), info: dict | None = None) -> Ranking:
    """The `top` M-subsets with the lowest sum of per-block scores, in exact order.

    A one-shot criterion removes the M blocks with the lowest score; the next configurations
    are the next-lowest sums. This is the CBO problem with a diagonal matrix, so the exact K-best
    solver enumerates them (scores are shifted to be non-negative; the reported candidate score is
    the sum of the unshifted block scores).
    """
    from cboprune.solvers.api import solve

    s = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        raise CBOPruneError(f"{method}: non-finite block scores {s.tolist()}: check the model and calibration data")
    keep = sorted(set(keep))
    check_n_remove(n_remove, len(s), len(keep))
    shift = float(s.min())
    ranking = solve(np.diag(s - shift), n_remove, top, keep=keep, method="exact")
    candidates = [Candidate(removed=c.removed, score=float(s[list(c.removed)].sum()), rank=c.rank,
                            tied_with_previous=c.tied_with_previous) for c in ranking.candidates]
    return Ranking(method=method, n_blocks=len(s), n_remove=n_remove, candidates=candidates,
                   exact=ranking.exact, info={"block_scores": s.tolist(), "keep": keep, **(info or {})})
