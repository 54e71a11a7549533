"""Sliding-Window Merging (SWM; Ding et al. 2025, arXiv:2502.19159, code: 920927/Sliding-Window-Merging,
earlier "SLM" script).

Our reading of the method (the published script `SLM.py` and the paper's description):
1. Reference output: the final hidden state (after the final norm) of the original model on the
   calibration samples.
2. A window [low, high] of consecutive blocks is slid from the top of the model to the bottom.
   It starts at high = N-2 (the last block is never merged, as in the script and in the CBO
   paper's Table 2, e.g. [24-30] for a 32-block model) and low = high-1.
3. The candidate model is the current model with blocks low..high merged into block low. Its
   similarity to the original is the cosine of the flattened final hidden states of a sample
   (real tokens only), averaged over samples. If it exceeds the threshold, the window grows
   downwards (low -= 1). Otherwise the last window that passed, [low+1, high], is merged for good
   (if it holds at least two blocks) and the next window starts below it; a window of two that
   fails moves down by one.
4. Merging rule: `cboprune.models.merging` ("difference": theta_low + sum_k (theta_k - theta_low)
   over the attention and MLP weights; norms keep the anchor's values).

Choices where the sources are silent or where we deviate (documented in docs/baselines.md):
- Equal M: the paper fixes a similarity threshold; to compare at equal M the threshold is found by
  bisection: the highest threshold (within `probes` bisection steps) whose sweep merges at least
  M blocks, and the sweep stops as soon as M blocks are gone (the last window is capped).
  Pass `threshold` to run the method with a fixed threshold instead.
- When the sweep reaches block 0 with a passing window it is merged (the script drops it).
- The script re-tests a one-block window after each merge (which loops forever once the
  cumulative similarity is below the threshold); we start the next window at two blocks.
- Candidate score: 1 - similarity of the final merged model (lower is better).

Every similarity evaluation is one forward pass over the calibration set with the merged
weights written into the anchor in place (restored afterwards) and the folded blocks gated off;
evaluations are memoized across bisection probes.
"""

from __future__ import annotations

import logging
import time

import torch

from cboprune.data.calibration import CalibrationSet
from cboprune.core.errors import CBOPruneError
from cboprune.models.gating import GateManager
from cboprune.models.masked import inference, n_blocks
from cboprune.models.forward_loss import model_device
from cboprune.models.architectures import blocks
from cboprune.models.merging import DEFAULT_MERGE_RULE, branch_parameters, merged_state
from cboprune.core.ranking import Candidate, Ranking, check_n_remove

log = logging.getLogger(__name__)

SWM_REFERENCE = "Ding et al., Sliding-Window Merging (arXiv:2502.19159)"

Group = tuple[int, int]  # (low, high), inclusive


def _final_hidden(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The last hidden state after the final norm ([B, S, D]), without the LM head when possible."""
    base = getattr(model, "base_model", None)
    if base is not None and base is not model:
        out = base(input_ids=ids, attention_mask=mask, use_cache=False)
        if getattr(out, "last_hidden_state", None) is not None:
            return out.last_hidden_state
    return model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True).hidden_states[-1]


class MergeSimilarity:
    """similarity(groups): mean over samples of the cosine between the flattened final hidden
    states of the model with `groups` merged and of the original model. Memoized."""

    def __init__(self, model: torch.nn.Module, calibration: CalibrationSet, *, batch_size: int = 8,
                 rule: str = DEFAULT_MERGE_RULE):
        self.model, self.calibration, self.batch_size, self.rule = model, calibration, batch_size, rule
        self.gates = GateManager(model, blocks(model))
        self.cache: dict[tuple[Group, ...], float] = {}
        self.passes = 0
        self.reference = [h.float() for h in self._outputs()]

    def _outputs(self) -> list[torch.Tensor]:
        device = model_device(self.model)
        outs = []
        with inference(self.model):
            for _, ids, mask in self.calibration.batches(self.batch_size):
                ids, mask = ids.to(device), mask.to(device)
                h = _final_hidden(self.model, ids, mask).float()
                outs.append(h * mask.unsqueeze(-1).to(h.dtype))  # padding contributes nothing
        return outs

    def __call__(self, groups: tuple[Group, ...]) -> float:
        key = tuple(sorted(groups))
        if key in self.cache:
            return self.cache[key]
        saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        folded = [i for lo, hi in key for i in range(lo + 1, hi + 1)]
        try:
            with torch.no_grad():
                for lo, hi in key:
                    state = merged_state(self.model, range(lo, hi + 1), self.rule)
                    params = branch_parameters(self.model, lo)
                    for name, value in state.items():
                        saved.append((params[name], params[name].detach().clone()))
                        params[name].copy_(value)
            self.gates.set(self.gates.removal_gates(folded) if folded else None)
            sims = []
            for ref, out in zip(self.reference, self._outputs()):
                sims.append(torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1), dim=1))
            value = float(torch.cat(sims).double().mean())
        finally:
            self.gates.set(None)
            with torch.no_grad():
                for p, v in saved:
                    p.copy_(v)
        self.passes += 1
        self.cache[key] = value
        return value

    def close(self) -> None:
        self.gates.remove()


def sweep(similarity: MergeSimilarity, n_blocks: int, threshold: float, max_remove: int | None = None,
          *, skip_last: bool = True) -> tuple[list[Group], list[dict]]:
    """One top-down pass at `threshold`; stops once `max_remove` blocks are folded. Returns the
    merge groups (low, high) and a trace of every window tried."""
    groups: list[Group] = []
    trace: list[dict] = []
    removed = 0
    cap = n_blocks if max_remove is None else max_remove
    high = n_blocks - 2 if skip_last else n_blocks - 1
    low = high - 1

    def commit(lo: int, hi: int) -> None:
        nonlocal removed
        groups.append((lo, hi))
        removed += hi - lo

    while low >= 0 and removed < cap:
        fits = high - low <= cap - removed
        sim = similarity(tuple(groups) + ((low, high),)) if fits else float("nan")
        accepted = fits and sim > threshold
        trace.append({"window": [low, high], "similarity": sim, "accepted": accepted})
        if accepted:
            low -= 1
            continue
        if high - (low + 1) >= 1:
            commit(low + 1, high)
            high = low
        else:
            high -= 1
        low = high - 1
    if low < 0 and high >= 1 and removed < cap and trace and trace[-1]["accepted"]:
        commit(0, high)  # the window reached block 0 still above the threshold
    return groups, trace


def sliding_window_merging(model: torch.nn.Module, calibration: CalibrationSet, n_remove: int | None = None, *,
                           threshold: float | None = None, batch_size: int = 8, rule: str = DEFAULT_MERGE_RULE,
                           probes: int = 8, skip_last: bool = True) -> Ranking:
    """Run SWM at equal M (`n_remove`, threshold found by bisection) or at a fixed `threshold`.

    The Ranking has one candidate: `merged` holds the groups (original indices, anchor first),
    `removed` the folded blocks; info["merge_rule"] tells surgery how to combine the weights.
    """
    n = n_blocks(model)
    if n_remove is None and threshold is None:
        raise CBOPruneError("swm needs a number of blocks to remove or a similarity threshold")
    if n_remove is not None:
        check_n_remove(n_remove, n - (1 if skip_last else 0))
    start = time.perf_counter()
    similarity = MergeSimilarity(model, calibration, batch_size=batch_size, rule=rule)
    try:
        if threshold is not None:
            tau = float(threshold)
            groups, trace = sweep(similarity, n, tau, n_remove, skip_last=skip_last)
            probes_done = []
        else:
            # Invariant: a sweep at `lo` folds M blocks, one at `hi` does not (similarity <= 1).
            lo, hi = -1.0, 1.0
            groups, trace = sweep(similarity, n, lo, n_remove, skip_last=skip_last)
            probes_done = [{"threshold": lo, "removed": sum(h - l for l, h in groups)}]
            for _ in range(probes):
                mid = (lo + hi) / 2
                g, t = sweep(similarity, n, mid, n_remove, skip_last=skip_last)
                got = sum(h - l for l, h in g)
                probes_done.append({"threshold": mid, "removed": got})
                if got >= n_remove:
                    lo, groups, trace = mid, g, t
                else:
                    hi = mid
            tau = lo
        final_sim = similarity(tuple(groups)) if groups else 1.0
    finally:
        similarity.close()
    n_folded = sum(h - l for l, h in groups)
    if n_remove is not None and n_folded != n_remove:
        raise CBOPruneError(f"swm folded {n_folded} blocks instead of {n_remove}: lower the threshold")
    merged = tuple(tuple(range(lo, hi + 1)) for lo, hi in sorted(groups))
    removed = tuple(sorted(i for g in merged for i in g[1:]))
    cand = Candidate(removed=removed, score=1.0 - final_sim, rank=0, merged=merged)
    return Ranking(method="swm", n_blocks=n, n_remove=len(removed), candidates=[cand],
                   info={"criterion": "cosine similarity of final hidden states, windows slid top-down",
                         "reference": SWM_REFERENCE, "merge_rule": rule, "threshold": tau,
                         "similarity": final_sim, "trace": trace, "probes": probes_done, "skip_last": skip_last,
                         "forward_passes": similarity.passes + 1, "seconds": round(time.perf_counter() - start, 2)})
