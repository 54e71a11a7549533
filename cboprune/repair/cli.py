"""`cboprune repair SOURCE`: arguments and handler (registered by cboprune.cli).

SOURCE is a pruned checkpoint (its removal.json names the original model and the removed blocks;
the map is fitted on the ORIGINAL model, so that model is loaded) or a model with `--blocks`.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cboprune.core.choices import REPAIR_OBJECTIVES, REPAIR_RIDGE
from cboprune.core.config import Config
from cboprune.core.errors import CBOPruneError
from cboprune.core.options import build, option, shared
from cboprune.core.outputs import read_json_object


@dataclass(kw_only=True)  # options in the order --help shows them, required or not
class RepairOptions:
    """The settings of `cboprune repair` (flags and YAML keys are generated from these declarations)."""
    source: str = option(help="pruned checkpoint directory (with removal.json), or a model (hub id, checkpoint "
                              "directory, .gguf, 'default') together with --blocks", positional=True)
    blocks: list[int] | None = option(None, "block indices to remove and repair, e.g. 25,26,27 (default: the "
                                            "'removed' list of SOURCE's removal.json)", "repair", kind="ints")
    data: str | None = option(None, "calibration .jsonl/.json/.txt file or hub dataset name; omit for "
                                    "model-generated calibration", "calibration")
    n_samples: int = option(64, "calibration samples the map is fitted on (default 64)", "calibration", kind="int",
                            minimum=1)
    seq_len: int = shared(Config, "seq_len")
    heldout: int = option(0, "also load this many more samples and print their NLL with plain removal and with "
                             "the repair", "calibration", kind="int", minimum=0)
    objective: str = option("lstsq", "; ".join(f"{k}: {v}" for k, v in REPAIR_OBJECTIVES.items()), "repair",
                            choices=tuple(sorted(REPAIR_OBJECTIVES)))
    ridge: float = option(REPAIR_RIDGE, f"ridge strength relative to the mean diagonal of XᵀX (default "
                                        f"{REPAIR_RIDGE:g})", "repair", kind="float")
    batch_size: int = shared(Config, "batch_size")
    dtype: str = shared(Config, "dtype")
    device: str | None = shared(Config, "device")
    seed: int = shared(Config, "seed")
    output_dir: str = option(help="where the repaired checkpoint goes", section="output")
    overwrite: bool = shared(Config, "overwrite")


def resolve_source(source: str, blocks: list[int] | None) -> tuple[str, list[int], dict[str, Any]]:
    """(original model spec, removed blocks, provenance to extend) for SOURCE and --blocks."""
    path = Path(source).expanduser()
    from cboprune.models.surgery import REMOVAL_FILE

    removal = path / REMOVAL_FILE
    if removal.is_file():
        prov = read_json_object(removal, "restore it, or pass the original model and --blocks")
        if "repair" in prov:
            raise CBOPruneError(f"{source} is already repaired: repair from its source model "
                                f"{prov.get('source_model')!r} instead")
        original, removed = prov.get("source_model"), prov.get("removed")
        if not original or not removed:
            raise CBOPruneError(f"{removal} names no source_model or removed blocks: pass the model and --blocks")
        if not isinstance(original, str) or not isinstance(removed, list) \
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in removed):
            raise CBOPruneError(f"{removal}: source_model must be a string and removed a list of block indices: "
                                "restore it, or pass the original model and --blocks")
        if blocks is not None and sorted(set(blocks)) != sorted(removed):
            raise CBOPruneError(f"--blocks {blocks} differs from the blocks {removed} removed in {source}: "
                                "drop --blocks, or pass the original model with --blocks")
        return original, list(removed), prov
    if not path.exists() and (source.startswith((".", "/", "~")) or path.suffix == ".gguf"):
        raise CBOPruneError(f"{source} does not exist: pass a pruned checkpoint directory or a model")
    if blocks is None:
        raise CBOPruneError(f"{source} has no {REMOVAL_FILE}: pass the blocks to remove with --blocks 3,7,12")
    return source, list(blocks), {"source_model": source, "method": "manual"}  # duplicates refused later


def run_repair_command(namespace: argparse.Namespace) -> int:
    from cboprune.models.masked import calibration_nll
    from cboprune.data import load_calibration
    from cboprune.models import load_model
    from cboprune.models.surgery import save_pruned, validate_removal
    from cboprune.core.outputs import check_output_dir
    from cboprune.core.distributed import pick_device
    from cboprune.repair.linear import check_options, plan_repair, repair_linear

    args = build(RepairOptions, namespace, "repair")
    check_options(args.objective, args.ridge)
    original, removed, prov = resolve_source(args.source, args.blocks)
    check_output_dir(args.output_dir, args.overwrite)
    loaded = load_model(original, dtype=args.dtype, device=pick_device(args.device))
    model = loaded.model
    n_blocks = model.config.get_text_config(decoder=True).num_hidden_layers
    removed = validate_removal(removed, n_blocks)
    plan_repair(model, removed)  # refuse before the calibration pass
    calib = load_calibration(args.data, loaded.tokenizer, model=model, n_samples=args.n_samples + args.heldout,
                             seq_len=args.seq_len, seed=args.seed)
    fit, held = calib.split(args.n_samples) if args.heldout else (calib, None)
    plain = calibration_nll(model, held, batch_size=args.batch_size, removed=removed) if held else None
    model, info = repair_linear(model, removed, fit, objective=args.objective, ridge=args.ridge,
                                batch_size=args.batch_size)
    if held is not None:
        repaired = calibration_nll(model, held, batch_size=args.batch_size)
        info["heldout_nll"] = {"n_samples": held.n_samples, "plain_removal": plain, "repaired": repaired}
        print(f"held-out NLL ({held.n_samples} samples): plain removal {plain:.4f}, repaired {repaired:.4f}")
    prov = {**copy.deepcopy(prov), "n_blocks_original": n_blocks, "n_removed": len(removed), "removed": removed,
            "kept": [i for i in range(n_blocks) if i not in set(removed)], "repair": info}
    out = save_pruned(model, loaded.tokenizer, args.output_dir, prov, overwrite=args.overwrite)
    for run in info["runs"]:
        print(f"blocks {run['removed']} -> {run['fold_into'][0]}: relative error {run['fit_error']:.4f} "
              f"(plain removal {run['identity_error']:.4f})")
    print(f"repaired checkpoint ({len(removed)} blocks removed) -> {out}")
    return 0
