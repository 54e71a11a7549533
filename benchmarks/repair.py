"""Linear repair on a real model: held-out NLL with plain removal vs repaired, several configurations.

    python benchmarks/repair.py --data ../shared/data/calib/alpaca_en_demo.json --out repair.jsonl

The maps of every configuration's runs, under both objectives, are fitted in ONE calibration pass
of the original model (`collect_moments` over the union of runs; the library's own path, the same
numbers `cboprune repair` gets for one configuration). Configurations: the last M blocks before the
final one, explicit `--config` index lists, and (with --angular / --bi) the best contiguous
window by angular distance and the Block Influence pick, from one block-statistics pass over the
first `--stats-samples` fitting samples. Each line of --out is one (configuration, variant)
result, written as it comes; the held-out samples are other samples of the same file.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time

import torch

from cboprune.baselines._common import collect_block_stats
from cboprune.baselines._similarity import angular_distance, block_influence
from cboprune.models.masked import calibration_nll
from cboprune.data import load_calibration
from cboprune.models import load_model
from cboprune.models.surgery import remove_blocks
from cboprune.repair.linear import OBJECTIVES, collect_moments, fold_repair, plan_repair, plan_runs, removed_runs

log = logging.getLogger("repair-bench")


def _configs(args, model, fit, n_blocks: int) -> dict[str, list[int]]:
    configs = {}
    for m in args.remove:
        configs[f"last{m}"] = list(range(n_blocks - 1 - m, n_blocks - 1))
    for text in args.config or []:
        blocks = sorted(int(t) for t in text.split(","))
        configs[f"M{len(blocks)}:{text}"] = blocks
    if args.angular or args.bi:
        stats = collect_block_stats(model, fit.split(args.stats_samples)[0] if args.stats_samples < fit.n_samples
                                    else fit, batch_size=args.batch_size)
        for m in args.remove:
            if args.angular:
                configs[f"angular{m}"] = list(angular_distance(model, fit, m, stats=stats).candidates[0].removed)
            if args.bi:
                configs[f"bi{m}"] = list(block_influence(model, fit, m, stats=stats).candidates[0].removed)
    unique: dict[str, list[int]] = {}
    for name, blocks in configs.items():  # e.g. BI picking the angular window: evaluate once
        same = next((n for n, b in unique.items() if b == blocks), None)
        if same is None:
            unique[name] = blocks
        else:
            log.info("configuration %s = %s: evaluated once", name, same)
    return unique


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--data", required=True)
    p.add_argument("--n-fit", type=int, default=64)
    p.add_argument("--n-heldout", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--remove", type=int, nargs="+", default=[8, 12], help="M values for last-M/angular/bi")
    p.add_argument("--config", action="append", help="explicit blocks, e.g. 5,12,13,14,15,16,17,25")
    p.add_argument("--angular", action="store_true")
    p.add_argument("--bi", action="store_true")
    p.add_argument("--stats-samples", type=int, default=32)
    p.add_argument("--ridge", type=float, nargs="+", default=[1e-4])
    p.add_argument("--objectives", nargs="+", default=sorted(OBJECTIVES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    loaded = load_model(args.model)
    model = loaded.model
    n_blocks = model.config.num_hidden_layers
    calib = load_calibration(args.data, loaded.tokenizer, n_samples=args.n_fit + args.n_heldout,
                             seq_len=args.seq_len, seed=args.seed)
    fit, held = calib.split(args.n_fit)
    meta = {"model": args.model, "fit": fit.describe(), "heldout": held.describe(), "threads": torch.get_num_threads()}
    out = open(args.out, "a")

    def write(record):
        out.write(json.dumps({**record, "time": time.strftime("%H:%M:%S")}) + "\n")
        out.flush()
        log.info("%s", record)

    configs = _configs(args, model, fit, n_blocks)
    write({"configs": configs, **meta})
    runs = list(dict.fromkeys(r for blocks in configs.values() for r in removed_runs(blocks)))
    t = time.perf_counter()
    moments = collect_moments(model, plan_runs(model, runs), fit, objectives=args.objectives,
                              batch_size=args.batch_size)
    write({"fit_pass_seconds": round(time.perf_counter() - t, 1), "n_runs": len(runs)})
    for name, blocks in configs.items():
        t = time.perf_counter()
        plain = remove_blocks(copy.deepcopy(model), blocks)
        write({"config": name, "removed": blocks, "variant": "plain",
               "nll": calibration_nll(plain, held, batch_size=args.batch_size),
               "seconds": round(time.perf_counter() - t, 1)})
        del plain
        for objective in args.objectives:
            for ridge in args.ridge:
                t = time.perf_counter()
                repaired = copy.deepcopy(model)
                records = fold_repair(repaired, plan_repair(repaired, blocks), moments, objective=objective,
                                      ridge=ridge)
                remove_blocks(repaired, blocks)
                write({"config": name, "removed": blocks, "variant": f"{objective}", "ridge": ridge,
                       "nll": calibration_nll(repaired, held, batch_size=args.batch_size), "runs": records,
                       "seconds": round(time.perf_counter() - t, 1)})
                del repaired
    t = time.perf_counter()  # last: on a shared machine the configurations matter more
    write({"config": "full", "variant": "full", "nll": calibration_nll(model, held, batch_size=args.batch_size),
           "seconds": round(time.perf_counter() - t, 1)})
    out.close()


if __name__ == "__main__":
    main()
