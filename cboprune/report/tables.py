"""Markdown tables and the run report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cboprune.core.finite import metric_cell

from cboprune.core.ranking import Ranking, found_by


def _ranges(indices: Sequence[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out, run = [], []
    for i in sorted(indices):
        if run and i == run[-1] + 1:
            run.append(i)
        else:
            if run:
                out.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
            run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)))
    return ", ".join(out)


def ranking_markdown(ranking: Ranking, block_kinds: Sequence[str] | None = None) -> str:
    if ranking.exact:
        status = "exact"
    elif ranking.lower_bound is not None:
        gap = ranking.info.get("gap")
        status = f"not certified: lower bound {ranking.lower_bound:.6g}" + (f", gap {gap:.3g}" if gap is not None else "")
    else:
        status = "heuristic"
    verification = ranking.info.get("verification")
    if verification:  # scores are measured held-out NLLs; the energies ride along
        status = "re-ranked by held-out loss" + (", swap-refined" if ranking.info.get("refine", {}).get("accepted")
                                                 else "")
    lines = [f"### {ranking.method}: remove M = {ranking.n_remove} of N = {ranking.n_blocks} blocks ({status})", ""]
    score = "held-out NLL + run cost" if verification and "heldout_nll" in verification else "held-out NLL"
    lines += ([f"| rank | {score} | energy | energy rank | removed blocks | kinds |", "|---:|---:|---:|---:|---|---|"]
              if verification else ["| rank | energy | removed blocks | kinds |", "|---:|---:|---|---|"])
    for i, cand in enumerate(ranking.candidates):
        kinds = ""
        if block_kinds:
            kinds = ", ".join(sorted({block_kinds[i] for i in cand.removed}))
        tie = " (tie)" if cand.tied_with_previous else ""
        if verification:
            e_rank = verification["energy_ranks"][i]
            lines.append(f"| {cand.rank} | {metric_cell(cand.score)} | {metric_cell(verification['energies'][i], '.6g')} | "
                         f"{found_by(verification, i) if e_rank is None else e_rank} | {_ranges(cand.removed)} | {kinds} |")
        else:
            lines.append(f"| {cand.rank}{tie} | {cand.score:.6g} | {_ranges(cand.removed)} | {kinds} |")
    return "\n".join(lines) + "\n"


def rankings_markdown(rankings: Sequence[Ranking], block_kinds: Sequence[str] | None = None) -> str:
    return "\n".join(ranking_markdown(r, block_kinds) for r in rankings)


def blocks_markdown(meta: dict[str, Any]) -> list[str]:
    """One row per block: index, module, kind, parameters."""
    names, kinds = meta.get("block_names") or [], meta.get("block_kinds") or []
    params = meta.get("block_params") or [None] * len(names)
    if not names:
        return []
    lines = ["## Blocks", "", "| block | module | kind | parameters |", "|---:|---|---|---:|"]
    for i, name in enumerate(names):
        kind = kinds[i] if i < len(kinds) else ""
        n = f"{params[i] / 1e6:.2f} M" if params[i] else ""
        lines.append(f"| {i} | `{name}` | {kind} | {n} |")
    return lines + [""]


def write_report(out_dir: str | Path, rankings: Sequence[Ranking], *, meta: dict[str, Any],
                 figures: dict[str, str], checkpoints: Sequence[dict[str, Any]] = (),
                 sections: Sequence[str] = ()) -> Path:
    """report.md: what was computed, the ranked states per M, `sections` (markdown: cost, the judge by
    healing), the figures and saved checkpoints."""
    out_dir = Path(out_dir)
    cal = meta.get("calibration", {})
    lines = [
        "# cboprune report", "",
        f"- model: `{meta.get('model', '')}` ({meta.get('model_type', '')}, {meta.get('n_blocks')} blocks, "
        f"{meta.get('model_params', 0) / 1e6:.1f} M parameters)",
        f"- calibration: {cal.get('source', '')} — {cal.get('n_samples')} samples, {cal.get('n_tokens')} tokens "
        f"(fingerprint {cal.get('fingerprint', '')}; rendered as {cal.get('rendering', 'plain text')})",
        f"- Hessian: {meta.get('variant', 'fisher')} H = AᵀA/m, mean calibration loss {meta.get('mean_loss', 0):.4f}, "
        f"{meta.get('seconds', 0)} s ({meta.get('tokens_per_second', 0)} tokens/s)",
        "",
        "Energies E(x) = xᵀQx + cᵀx of the energy model named in each ranking (x: the removed-block "
        "indicator; `cbo` alone is the paper's xᵀHx) predict the loss increase; re-ranked lists are ordered by "
        "the loss measured on held-out calibration samples (docs/study.md).",
        "",
        rankings_markdown(rankings, meta.get("block_kinds")),
    ]
    lines += blocks_markdown(meta)
    lines += list(sections)
    for title, rel in figures.items():
        lines += [f"## {title}", "", f"![{title}]({rel})", ""]
    if checkpoints:
        lines += ["## Pruned checkpoints", "",
                  "| M | rank | removed | parameters removed | prefill speed-up | decode speed-up | path |",
                  "|---:|---:|---|---:|---:|---:|---|"]
        for ck in checkpoints:
            sp = ck.get("speedup") or {}
            cells = ([f"{sp['params_removed']:,} ({sp['params_removed_fraction']:.1%})",
                      f"{sp['prefill_speedup']:.2f}×", f"{sp['decode_speedup']:.2f}×"] if sp else ["—"] * 3)
            lines.append(f"| {ck['n_remove']} | {ck['rank']} | {_ranges(ck['removed'])} | {' | '.join(cells)} "
                         f"| `{ck['path']}` |")
        if any(ck.get("speedup") for ck in checkpoints):
            sp = next(ck["speedup"] for ck in checkpoints if ck.get("speedup"))
            lines.append(f"\nSpeed-ups measured against the original on {sp.get('device')} (batch 1, 128 prompt "
                         "tokens, 16 decoded, median of 3 alternating repetitions): attention, the LM head and the "
                         "embedding do not shrink, so they are below the layer ratio. `cboprune bench` measures more "
                         "shapes.")
        repaired = [ck for ck in checkpoints if ck.get("repair")]
        if repaired:
            lines.append("\nRepaired without training (`--repair linear`): each removed run of blocks replaced by a "
                         "linear map fitted on the fitting samples and folded into the kept weights; in-sample "
                         "relative error of the map (of plain removal): " + "; ".join(
                             f"M = {ck['n_remove']} rank {ck['rank']}: " + ", ".join(
                                 f"{_ranges(r['removed'])} {r['fit_error']:.3f} ({r['identity_error']:.3f})"
                                 for r in ck["repair"]["runs"]) for ck in repaired) + ".")
        lines.append("")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    import csv

    with Path(path).open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
