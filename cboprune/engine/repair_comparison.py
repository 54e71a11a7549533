"""Repair as a mode of `compare` / `study` (`--repair linear`): every distinct configuration is also
evaluated after the training-free linear repair, exactly as the unrepaired one, and (with
`--heal-steps`) healed from the repaired model with the same recipe (`healing_study.heal_entries`).

    repair_entries(entries, model, ...)   entry.repaired = {"nll", "eval", "seconds", "runs"}
    repair_markdown(entries, meta, label) the before/after page (repair.md)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cboprune.evaluation.metrics import mean_accuracy, primary_scores
from cboprune.core.finite import metric_cell
from cboprune.engine.configurations import configuration_key, merge_rule_of
from cboprune.models.masked import calibration_nll
from cboprune.repair import repair_linear
from cboprune.report.tables import markdown_table

if TYPE_CHECKING:
    from cboprune.data.calibration import CalibrationSet
    from cboprune.evaluation.protocol import EvalProtocol
    from cboprune.core.ranking import Entry

log = logging.getLogger(__name__)


def repaired_copy(model, removed: Sequence[int], fit: CalibrationSet, *, batch_size: int = 8):
    """(a repaired, pruned copy of `model`, the repair info); the original stays intact."""

    return repair_linear(copy.deepcopy(model), list(removed), fit, batch_size=batch_size)


def repair_entries(entries: Sequence[Entry], model, tokenizer, protocol: EvalProtocol, *, fit: CalibrationSet,
                   nll_samples: CalibrationSet, batch_size: int = 8) -> None:
    """entry.repaired for every distinct removal configuration (merged ones, e.g. SWM's, stay None:
    the linear stand-in replaces removed blocks, not merged ones)."""

    done: dict[tuple, Entry] = {}
    for entry in entries:
        if entry.candidate.merged:
            continue
        key = configuration_key(entry.candidate, merge_rule_of(entry))
        if key in done:
            entry.repaired = done[key].repaired
            continue
        t0 = time.perf_counter()
        repaired, info = repaired_copy(model, entry.candidate.removed, fit, batch_size=batch_size)
        fit_seconds = time.perf_counter() - t0
        entry.repaired = {"nll": calibration_nll(repaired, nll_samples, batch_size=batch_size),
                          "eval": protocol.evaluate(repaired, tokenizer), "seconds": round(fit_seconds, 2),
                          "runs": [{k: r[k] for k in ("removed", "fit_error", "identity_error")} for r in info["runs"]]}
        del repaired
        done[key] = entry
        log.info("repaired %s at M = %d: NLL %.4f -> %.4f (repair %.1f s)", entry.method, entry.n_remove,
                 entry.nll if entry.nll is not None else math.nan, entry.repaired["nll"], fit_seconds)


def repair_markdown(entries: Sequence[Entry], meta: dict[str, Any], label) -> str:
    """Before and after repair side by side, and, where healed, repair + heal against heal alone."""

    ppl = meta["ppl_tasks"][0] if meta.get("ppl_tasks") else None
    accuracy = [t for t in meta["tasks"] if t not in meta.get("ppl_tasks", [])]

    def scores(ev) -> list[str]:
        out = []
        if ppl:
            v = primary_scores(ev).get(ppl) if ev else None
            out.append(metric_cell(v, ".2f"))
        acc = mean_accuracy(ev, accuracy) if ev else None
        return out + [metric_cell(acc)]

    cols = ([ppl] if ppl else []) + ["mean acc"]
    header = ["M", "method", "removed", "NLL pruned", "NLL repaired", *[f"{c} pruned" for c in cols],
              *[f"{c} repaired" for c in cols], "repair s"]
    rows = []
    for e in entries:
        if e.repaired is None or e.same_as:
            continue
        r = e.repaired
        rows.append([str(e.n_remove), label(e.method), "[" + ", ".join(map(str, e.candidate.removed)) + "]",
                     metric_cell(e.nll), metric_cell(r['nll']), *scores(e.eval),
                     *scores(r["eval"]), f"{r['seconds']:.1f}"])
    text = [f"# Training-free linear repair: {meta['model']} (N = {meta['n_blocks']})\n",
            "Each removed run of blocks replaced by a least-squares linear map fitted on the fitting samples "
            "(one pass of the original model) and folded into the preceding kept block's output projection "
            "(`cboprune.repair`). NLL: the comparison's own samples. Lower is better for NLL and perplexity.\n",
            markdown_table(header, rows)]
    steps = (meta.get("healing") or {}).get("steps") or []
    healed = [e for e in entries if e.repair_healed and not e.same_as]
    if steps and healed:
        header = ["M", "method", "removed"]
        for s in steps:
            header += [f"NLL heal {s}", f"NLL repair + heal {s}", f"heal CE {s}", f"repair + heal CE {s}"]
        rows = []
        for e in healed:
            row = [str(e.n_remove), label(e.method), "[" + ", ".join(map(str, e.candidate.removed)) + "]"]
            for s in steps:
                h, rh = e.healed.get(s) or {}, e.repair_healed.get(s) or {}

                def f(d, k):
                    return metric_cell(d.get(k))

                row += [f(h, "nll"), f(rh, "nll"), f(h, "heal_ce"), f(rh, "heal_ce")]
            rows.append(row)
        text += ["## Does repair shorten healing? The same recipe from the pruned and from the repaired model\n",
                 markdown_table(header, rows)]
    return "\n".join(text)
