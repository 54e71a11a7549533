"""The judge of `cboprune run`: a short, identical heal of the best verified states of each M, which
then lead the ranking in their order by the cross-entropy after healing on held-out records of the
heal data (never trained on). On with `--heal-candidates C`; off by default since 2026-12-08: with
re-centring, its one measured call after a 30-step heal was a tie (M = 8) and an agreement with the
verified order (M = 12), and its 8 forward passes broke the default's budget of 20 (docs/study.md,
"Within the budget").

Why a heal and not a pre-heal loss: on the default model the two best verified M = 12 states are
0.04 nats apart before healing in the wrong order, and 0.09 apart the other way after 30 steps;
3 steps already order them as 30 do at M = 8 and 12 (docs/study.md, "The M = 12 gap").

The recipe is fixed here (one place) so that every candidate, and every run, is judged alike; only
the number of candidates (`--heal-candidates`) and of steps (`--judge-steps`) are options.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cboprune.core.finite import metric_cell, metric_key
from cboprune.heal.recipe import HealRecipe
from cboprune.engine.healing_study import heal_entries
from cboprune.core.ranking import Candidate, Entry, Ranking
from cboprune.report.tables import markdown_table
from cboprune.selection.verify import measured_nll

#: the recipe of every judge heal: the after-healing study's, shortened (docs/study.md)
JUDGE_LR = 2e-4
JUDGE_SEQ_LEN = 192  # or the calibration length when shorter
JUDGE_BATCH = 8  # sequences per optimizer step
JUDGE_MICRO_BATCH = 4
#: held-out records of the heal data the candidates are ranked by (half of the evaluation's cost)
JUDGE_RECORDS = 25


def judge_recipe(cfg, output_dir: Path):
    """The HealRecipe of every judge heal (checks the heal data before any work)."""
    data = cfg.heal_data or cfg.data or ""
    return HealRecipe(steps=[cfg.judge_steps], data=data, teacher=cfg.model, learning_rate=JUDGE_LR,
                      seq_len=min(JUDGE_SEQ_LEN, cfg.heal_seq_len or cfg.seq_len),
                      micro_batch_size=JUDGE_MICRO_BATCH, global_batch_size=JUDGE_BATCH, lora=cfg.heal_lora,
                      seed=cfg.seed, teacher_cache=cfg.teacher_cache_dir(), cache_dir=None,
                      heldout_eval="after-ce", heldout_samples=JUDGE_RECORDS)


def judge_by_healing(cfg, session, rankings: Sequence[Ranking], staging: Path,
                     candidates: int) -> tuple[list[Ranking], str, dict[int, float]]:
    """Heal the `candidates` best states of each M alike (`judged_states`) and put them first, ordered by the held-out
    cross-entropy after healing: the short heal chooses the state that is saved. Returns the new
    rankings, the report section and the judge's cost per M in forward passes of the fitting set."""

    recipe = judge_recipe(cfg, staging)
    if recipe.teacher_cache is None:  # one teacher pass over the heal samples, shared by every candidate
        recipe.teacher_cache = staging / ".heal-judge-teacher"
    steps = recipe.steps[0]
    out, rows, cost = [], [], {}
    for ranking in rankings:
        # The best states, not a structurally diverse set: one swap apart, two states heal 0.07 nats
        # apart at M = 12 on the default model (docs/study.md, "Fewer gaps heal better").
        picks = judged_states(ranking, candidates)
        # Before and after on the same samples, the verification's held-out ones: the NLL proper, not
        # the verified score (which may carry the energy's run cost).
        nll_before = measured_nll(ranking) if ranking.info.get("verification") else [None] * len(picks)
        entries = [Entry(f"rank{c.rank}", ranking.n_remove, c, ranking, 0.0, nll=nll_before[i])
                   for i, c in enumerate(picks)]
        heal_entries(entries, session.model, session.tokenizer, recipe, NoEval(), nll_samples=session.heldout,
                     batch_size=cfg.batch_size, workdir=staging / ".heal-judge")
        entries.sort(key=lambda e: metric_key(e.healed[steps]["heal_ce"]))
        held_tokens = session.heldout.n_tokens if session.heldout is not None else 0
        cost[ranking.n_remove] = sum(heal_cost(e.healed[steps], session.fit.n_tokens, held_tokens) for e in entries)
        for place, e in enumerate(entries):
            h = e.healed[steps]
            rows.append([str(ranking.n_remove), str(place), str(e.candidate.rank), str(list(e.candidate.removed)),
                         metric_cell(e.nll), metric_cell(h["nll"]), metric_cell(h["heal_ce"]),
                         f"{h['seconds']:.0f}"])
        chosen = [e.candidate for e in entries]
        rest = [c for c in ranking.candidates if c.removed not in {p.removed for p in chosen}]
        judge = {"steps": steps, "recipe": recipe.describe(), "order": [list(c.removed) for c in chosen],
                 "healed_ce": [e.healed[steps]["heal_ce"] for e in entries],
                 "heldout_nll_before": [e.nll for e in entries],
                 "heldout_nll_after": [e.healed[steps]["nll"] for e in entries],
                 "forward_passes": round(cost[ranking.n_remove], 2),
                 "seconds": round(sum(e.healed[steps]["seconds"] for e in entries), 2)}
        info = {**ranking.info, "verification": _reordered(ranking, chosen + rest), "heal_judge": judge}
        out.append(replace(ranking, candidates=[replace(c, rank=r) for r, c in enumerate(chosen + rest)],
                           exact=False, info=info))
    shutil.rmtree(staging / ".heal-judge-teacher", ignore_errors=True)
    text = ["## Chosen after a short heal", "",
            f"The {candidates} best verified states of each M were each healed alike ({steps} steps of "
            f"{recipe.global_batch_size} x {recipe.seq_len} tokens, lr {recipe.learning_rate}, seed {recipe.seed}, "
            f"teacher outputs cached once); they now lead the ranking in their order by the cross-entropy after "
            f"healing on (up to) {recipe.heldout_samples} held-out records of the heal data (never trained on), so rank 0 "
            "is the winner and rank 1 the runner-up (`--heal-candidates 0`: off). Cost of the judge in forward "
            "passes of the fitting set: " + ", ".join(f"M = {m}: {c:.1f}" for m, c in cost.items()) + ".", "",
            markdown_table(["M", "place", "rank before", "removed", "held-out NLL before", "held-out NLL after",
                            "heal CE after", "heal s"], rows)]
    return out, "\n".join(text), cost


def judged_states(ranking: Ranking, candidates: int) -> list[Candidate]:
    """The `candidates` best states, except that when hybrid's re-centring moved the pick, the verified
    pick it started from takes the last seat: a re-centred state has to heal better than that one too
    (at M = 8 on the default model it did not; docs/study.md, "Re-centring at the verified pick")."""
    picks = list(ranking.candidates[:candidates])
    path = (ranking.info.get("recentre") or {}).get("path") or []
    start = tuple(path[0]) if path else None
    if candidates >= 2 and start is not None and start not in {c.removed for c in picks}:
        listed = [c for c in ranking.candidates if c.removed == start]
        if listed:
            picks[-1] = listed[0]
    return picks


def _reordered(ranking: Ranking, order: Sequence[Candidate]) -> dict[str, Any] | None:
    """The ranking's per-candidate verification lists, aligned with the candidates in `order`."""
    verification = ranking.info.get("verification")
    if not verification:
        return verification
    where = {c.removed: i for i, c in enumerate(ranking.candidates)}
    aligned = {key: [verification[key][where[c.removed]] for c in order]
               for key in ("energies", "energy_ranks", "heldout_nll", "found_by", "worst_domain") if key in verification}
    if verification.get("domains"):
        aligned["domains"] = {n: [v[where[c.removed]] for c in order] for n, v in verification["domains"].items()}
    return {**verification, **aligned}


def heal_cost(result: dict[str, Any], fit_tokens: int, nll_tokens: int = 0) -> float:
    """A judge heal in forward passes of the fitting set: the student's forward + backward (3) over the
    trained positions, one forward over the held-out records, the teacher's forward where this heal
    computed teacher outputs (every heal without a cache; with one, the heal that filled it), and one
    forward of the healed model over the `nll_tokens` verification samples it is scored on."""
    positions = result.get("token_positions") or {}
    train, held = positions.get("train", 0), positions.get("heldout", 0)
    computed = result.get("teacher_samples_computed")
    teacher = train if computed is None else (train + held if computed else 0)
    measured = nll_tokens if result.get("nll") is not None else 0
    return (3 * train + held + teacher + measured) / max(fit_tokens, 1)


class NoEval:
    """The judge needs only the held-out loss, not the benchmarks."""

    task_names: list[str] = []

    def evaluate(self, model, tokenizer):
        return {"results": {}}

    def describe(self):
        return {}

    def identity(self):
        return {}
