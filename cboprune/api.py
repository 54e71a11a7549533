"""One in-memory call, like `peft.get_peft_model`: prune a loaded model and get its ranking back.

    import cboprune
    model, ranking = cboprune.prune(model, tokenizer, "chats.jsonl", n_remove=8)
    model.save_pretrained("pruned")   # or cboprune.models.surgery.save_pruned(..., provenance)

The selection is `cboprune run`'s (the default energy, verification on held-out samples; the
judge's heals need a teacher checkpoint on disk, so they are `run`'s alone) through the same engine
call (`experiment.rank_states`), with every option validated by `Config` as on the command line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from cboprune.core.config import Config
from cboprune.data.calibration import check_data, load_calibration
from cboprune.engine.experiment import SelectionContext, rank_states
from cboprune.models.masked import n_blocks
from cboprune.models.architectures import blocks, removable_blocks
from cboprune.models.surgery import remove_blocks
from cboprune.core.ranking import Ranking
from cboprune.engine.session import check_against_model


def prune(model: nn.Module, tokenizer, data: str | None = None, *, n_remove: int, rank: int = 0,
          energy: str | None = None, verify: bool | None = None, top: int = 10, n_samples: int = 64,
          heldout_samples: int = 16, seq_len: int = 256, batch_size: int = 8, keep: Sequence[int] = (),
          only: Sequence[str] | None = None, seed: int = 0, progress: bool = False,
          **options: Any) -> tuple[nn.Module, Ranking]:
    """Remove `n_remove` blocks from `model` in place, chosen on `data` (a local file, a weighted mix
    `a.json:0.7,b.txt:0.3`, a hub dataset, or None: the model answers cboprune's built-in prompts);
    return the pruned model and the ranking of the `top` best states (the removed one is
    `ranking.candidates[rank]`). Any other `cboprune run` option (`run_cost`, `single_samples`, `pool`,
    `solver`, ...) is accepted by name. Bad options are one-line `CBOPruneError`s before any work."""
    settings = {"data": data, "remove": [n_remove], "top": top, "n_samples": n_samples,
                "heldout_samples": heldout_samples, "seq_len": seq_len, "batch_size": batch_size, "keep": list(keep),
                "only": list(only) if only else None, "seed": seed, **options}
    if energy is not None:
        settings["energy"] = energy
    if verify is not None:
        settings["verify"] = verify
    cfg = Config.from_sources(None, {k: v for k, v in settings.items() if v is not None}, command="run")
    if not 0 <= rank < cfg.top:
        raise ValueError(f"rank must lie in 0..top-1 = 0..{cfg.top - 1}, got {rank}")
    check_data(cfg.data)
    kinds = [b.kind for b in blocks(model)]
    kept = check_against_model(cfg, n_blocks(model), kinds)
    checks = cfg.verify or cfg.refine_sweeps > 0
    calibration = load_calibration(cfg.data, tokenizer, model=model, seq_len=cfg.seq_len, seed=cfg.seed,
                                   n_samples=cfg.n_samples + (cfg.heldout_samples if checks else 0))
    fit, heldout = calibration.split(cfg.n_samples) if checks else (calibration, None)
    context = SelectionContext(model, fit, heldout, batch_size=cfg.batch_size, keep=tuple(kept),
                               removable=removable_blocks(kinds, cfg.only, kept) if cfg.only else None,
                               seed=cfg.seed, solver=cfg.solver, time_limit=cfg.time_limit, node_limit=cfg.node_limit,
                               options={"pool": cfg.pool, "relin_step": cfg.relin_step,
                                        "single_samples": cfg.single_samples, "run_cost": cfg.run_cost, "recentre": cfg.recentre},
                               model_name=getattr(model, "name_or_path", ""), progress=progress)
    (ranking,) = rank_states(context, cfg.remove, cfg.top, energy=cfg.energy, verify=cfg.verify,
                             refine_sweeps=cfg.refine_sweeps)
    if rank >= len(ranking.candidates):
        raise ValueError(f"only {len(ranking.candidates)} states were listed: pass a smaller rank")
    return remove_blocks(model, ranking.candidates[rank].removed), ranking


__all__ = ["prune"]
