"""The last M blocks before the final one: a trivial but strong baseline after fine-tuning (deep
blocks are the most redundant; the final block maps to the LM head and is kept)."""

from __future__ import annotations

from cboprune.core.methods import PEER, Method, register


def last_blocks(n_blocks: int, n_remove: int, keep=()) -> tuple[int, ...]:
    """The M highest-indexed blocks below the final block that are not kept."""
    from cboprune.core.errors import CBOPruneError

    pool = [i for i in range(n_blocks - 2, -1, -1) if i not in set(keep)]
    if n_remove > len(pool):
        raise CBOPruneError(f"last-m: only {len(pool)} blocks below the final one are removable, fewer than "
                            f"M = {n_remove}")
    return tuple(sorted(pool[:n_remove]))


def _select(context, remove):
    from cboprune.core.ranking import Candidate, Ranking

    n = context.n_blocks
    return {m: Ranking(method="last-m", n_blocks=n, n_remove=m,
                       candidates=[Candidate(removed=last_blocks(n, m, context.keep), score=0.0, rank=0)],
                       info={"criterion": "the last M blocks before the final one", "forward_passes": 0})
            for m in remove}


register(Method(
    name="last-m", label="Last M before final", kind=PEER, order=90, ranked=False, min_kept=2,
    summary="remove the M blocks just before the final block (no data)",
    reference="Gromov et al. (arXiv:2403.17887); Men et al. (arXiv:2403.03853)", needs=(), select=_select,
    cost=lambda n, m, **_: 0.0, cost_formula="0"))
