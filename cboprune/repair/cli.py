"""`cboprune repair SOURCE`: arguments and handler (registered by cboprune.cli).

SOURCE is a pruned checkpoint (its removal.json names the original model and the removed blocks;
the map is fitted on the ORIGINAL model, so that model is loaded) or a model with `--blocks`.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from cboprune.config import _int_list, option_default, option_help
from cboprune.errors import CBOPruneError
from cboprune.outputs import read_json_object


def add_repair_arguments(p: argparse.ArgumentParser) -> None:
    from cboprune.config import REPAIR_OBJECTIVES as OBJECTIVES
    from cboprune.config import REPAIR_RIDGE as DEFAULT_RIDGE

    p.add_argument("source", help="pruned checkpoint directory (with removal.json), or a model (hub id, checkpoint "
                                  "directory, .gguf, 'default') together with --blocks")
    p.add_argument("--blocks", type=_int_list, help="block indices to remove and repair, e.g. 25,26,27 "
                                                    "(default: the 'removed' list of SOURCE's removal.json)")
    p.add_argument("--data", help="calibration .jsonl/.json/.txt file or hub dataset name; omit for "
                                  "model-generated calibration")
    p.add_argument("--n-samples", type=int, default=64, help="calibration samples the map is fitted on")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heldout", type=int, default=0, help="also load this many more samples and print their "
                                                          "NLL with plain removal and with the repair")
    p.add_argument("--objective", choices=sorted(OBJECTIVES), default="lstsq",
                   help="; ".join(f"{k}: {v}" for k, v in OBJECTIVES.items()))
    p.add_argument("--ridge", type=float, default=DEFAULT_RIDGE,
                   help="ridge strength relative to the mean diagonal of XᵀX (default %(default)g)")
    p.add_argument("--batch-size", type=int, default=option_default("batch_size"), help=option_help("batch_size"))
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", help=option_help("device"))
    p.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    p.add_argument("--output-dir", required=True, help="where the repaired checkpoint goes")
    p.add_argument("--overwrite", action="store_true")


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


def run_repair_command(args: argparse.Namespace) -> int:
    from cboprune.masked import calibration_nll
    from cboprune.data import load_calibration
    from cboprune.models import load_model
    from cboprune.models.surgery import save_pruned, validate_removal
    from cboprune.outputs import check_output_dir
    from cboprune.distributed import pick_device
    from cboprune.repair.linear import check_options, plan_repair, repair_linear

    if args.heldout < 0 or args.n_samples < 1:
        raise CBOPruneError("--n-samples must be >= 1 and --heldout >= 0")
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
