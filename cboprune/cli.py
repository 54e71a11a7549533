"""The `cboprune` console script: thin subcommands over the library.

    cboprune run      whole pipeline from a YAML config and/or flags (flags win)
    cboprune hessian  per-sample gate gradients -> hessian.safetensors
    cboprune solve    K lowest CBO states for several M from a saved Hessian
    cboprune prune    remove blocks (a ranked state or explicit indices) and save a checkpoint
    cboprune eval     evaluate a model or checkpoint (perplexity, benchmarks)
    cboprune heal     distill the original model into a pruned checkpoint (resumable, LoRA option)
    cboprune repair   training-free linear repair of removed blocks, folded into the kept weights
    cboprune bench    size and speed of pruned checkpoints next to the original (--engine llama.cpp: GGUF files)
    cboprune export   a checkpoint to GGUF (f16, bf16, q8_0) for llama.cpp
    cboprune methods  every registered selection method: needs and cost
    cboprune compare  CBO and its peers (BI, SLEB, SWM, ...) at equal M, evaluated alike
    cboprune study    every energy model and peer: energy vs real loss, which configuration wins
    cboprune archs    supported model types and their block kinds (or one model's blocks)

User errors print one line (`cboprune: error: ...`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from dataclasses import asdict, dataclass
import sys
from pathlib import Path

from cboprune.core.version import __version__
from cboprune.core.config import HUB_FIELDS, Config, command_fields, config_from_args
from cboprune.core.options import add_arguments, build, option, read_yaml
from cboprune.core.errors import CBOPruneError

log = logging.getLogger("cboprune")


# The per-invocation options of the commands that otherwise take Config's sections: declared like
# every other option (one generator of flags, YAML keys, one-line checks).
@dataclass(kw_only=True)
class HessianFileOptions:
    output: str = option("hessian.safetensors", "file to write (default hessian.safetensors)", "output")
    overwrite: bool = option(False, "replace an existing --output file", "output", kind="flag")


@dataclass(kw_only=True)
class SolveOptions:
    hessian: str = option(help="file written by `cboprune hessian` or `run`", section="input")
    export_qubo: str | None = option(None, "also write each M's penalty QUBO (xᵀHx + P(Σx−M)², P provably "
                                           "exact) as PREFIX-M{M}.json and .qubo", "output", metavar="PREFIX")


@dataclass(kw_only=True)
class PruneOptions:
    hessian: str | None = option(None, "pick the state from this Hessian's ranking (with --remove M and --rank)",
                                 "input")
    rank: int = option(0, "which state of the ranking (0 = ground state)", "input", kind="int", minimum=0)
    blocks: list[int] | None = option(None, "explicit block indices to remove, e.g. 3,7,12", "input", kind="ints")
    output: str | None = option(None, "write a GGUF instead of a checkpoint: --model is a GGUF whose kept "
                                      "blocks' quantized tensors are copied bit for bit (docs/gguf.md)", "output",
                                metavar="FILE.gguf")
    blocks_from: str | None = option(None, "with --output: remove the blocks a pruned or healed checkpoint's "
                                           "removal.json names (e.g. `run`'s pick) from the source GGUF, "
                                           "quantization kept", "input", metavar="CHECKPOINT")


@dataclass(kw_only=True)
class ArchsOptions:
    model: str | None = option(None, "show this model's blocks (index, kind, gated branches, parameters) instead",
                               "options")
    dtype: str = option("float32", "dtype to load --model in (default float32)", "options")
    json: bool = option(False, "print JSON", "options", kind="flag")


@dataclass(kw_only=True)
class MethodsOptions:
    json: bool = option(False, "print JSON", "options", kind="flag")


#: command -> its own option class, beside Config's sections
_OWN_OPTIONS = {"hessian": HessianFileOptions, "solve": SolveOptions, "prune": PruneOptions,
                "archs": ArchsOptions, "methods": MethodsOptions}


def _own_options(args: argparse.Namespace, command: str) -> argparse.Namespace:
    """`args` with the command's own options filled from their declarations (defaults, YAML, flags)."""
    values = asdict(build(_OWN_OPTIONS[command], args, command))
    return argparse.Namespace(**{**vars(args), **values})


#: (command, module with run_<command>_command, the module holding its option class, that class, help)
_MODULE_COMMANDS = (
    ("bench", "cboprune.bench.cli", "cboprune.bench.cli", "BenchOptions",
     "size and speed of pruned checkpoints next to the original"),
    ("repair", "cboprune.repair.cli", "cboprune.repair.cli", "RepairOptions",
     "training-free linear repair of removed blocks, folded into the kept weights"),
    ("eval", "cboprune.evaluation.cli", "cboprune.evaluation.cli", "EvalOptions",
     "perplexity and benchmarks (built-in or lm-eval backend)"),
    ("heal", "cboprune.heal.cli", "cboprune.heal.recipe", "HealConfig",
     "knowledge-distillation retraining of a pruned checkpoint (LoRA option)"),
    ("export", "cboprune.gguf.cli", "cboprune.gguf.cli", "ExportOptions",
     "a Hugging Face checkpoint to GGUF (f16, bf16, q8_0) for llama.cpp"),
)


def _add_config(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--config", help="YAML file with this command's settings (flags override it)")
    add_arguments(p, Config, command_fields(command))


def _handler(module: str, name: str):
    """A command's handler, imported when the command runs: building the parser (and `--help`)
    imports no torch, transformers or numba."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cboprune", description="Remove whole transformer blocks from LLMs "
                                     "by constrained binary optimization (CBO).")
    parser.add_argument("--version", action="version", version=f"cboprune {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="whole pipeline: Hessian, K lowest states per M, report, pruned checkpoints",
                       description="The paper's method: --energy fisher --no-verify --refine-sweeps 0.")
    _add_config(p, "run")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("hessian", help="per-sample gate gradients A and H = AᵀA/m, saved to one file "
                                       "(runs data-parallel under torchrun / accelerate launch)")
    _add_config(p, "hessian")
    add_arguments(p, HessianFileOptions)
    p.set_defaults(func=cmd_hessian)

    p = sub.add_parser("solve", help="K lowest CBO states for several M from a saved Hessian")
    add_arguments(p, SolveOptions)
    _add_config(p, "solve")
    p.set_defaults(func=cmd_solve)

    p = sub.add_parser("prune", help="remove blocks and save a checkpoint that loads with from_pretrained")
    add_arguments(p, PruneOptions)
    _add_config(p, "prune")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("archs", help="supported model types with their block kinds, or the blocks of one model")
    add_arguments(p, ArchsOptions)
    p.set_defaults(func=cmd_archs)

    p = sub.add_parser("methods", help="every registered selection method: name, kind, needs, cost")
    add_arguments(p, MethodsOptions)
    p.set_defaults(func=cmd_methods)

    for name, module, options_module, options_class, help_ in _MODULE_COMMANDS:  # their own option classes
        p = sub.add_parser(name, help=help_)
        add_arguments(p, getattr(importlib.import_module(options_module), options_class))
        add_arguments(p, Config, HUB_FIELDS)  # every one of them loads a model
        p.add_argument("--config", metavar="FILE.yaml", help="settings from a YAML file: its keys are this "
                       "command's flags with underscores; flags given on the command line win")
        p.set_defaults(func=_handler(module, f"run_{name}_command"))

    p = sub.add_parser("compare", help="CBO and its peers at equal M on the same calibration data, evaluated alike")
    _add_config(p, "compare")
    p.set_defaults(func=_handler("cboprune.workflows.compare", "run_compare_command"))

    p = sub.add_parser("study", help="every energy model and peer on one model: energy vs held-out loss, "
                                     "verified picks, evaluated alike")
    _add_config(p, "study")
    p.set_defaults(func=_handler("cboprune.workflows.study", "run_study_command"))  # with --calibrations: many studies
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from cboprune.workflows.run import run_pipeline
    from cboprune.report.tables import rankings_markdown

    cfg = config_from_args(args, "run")
    result = run_pipeline(cfg, progress=not args.quiet)
    print(rankings_markdown(result.rankings, result.hessian.block_kinds))
    for ck in result.checkpoints:
        print(f"saved M={ck['n_remove']} rank {ck['rank']} (removed {ck['removed']}) -> {ck['path']}"
              + (f" (healed: {ck['healed']})" if ck.get("healed") else ""))
    print(f"report: {result.output_dir / 'report.md'}")
    return 0


def cmd_hessian(args: argparse.Namespace) -> int:
    args = _own_options(args, "hessian")
    from cboprune.core import distributed
    from cboprune.data import GenerationSettings, load_calibration
    from cboprune.selection.hessian import compute_hessian, cost_summary, save_hessian
    from cboprune.models import load_model
    from cboprune.data.calibration import check_data
    from cboprune.core.outputs import check_output_file
    from cboprune.core.distributed import pick_device
    from cboprune.workflows.run import hessian_options

    out = check_output_file(args.output, args.overwrite)
    cfg = config_from_args(args, "hessian")
    check_data(cfg.data)  # before the model loads
    dist = distributed.init_from_env()  # world size 1 unless launched by torchrun / accelerate
    device = pick_device(cfg.device) if not dist.enabled else (cfg.device or distributed.local_device())
    loaded = load_model(cfg.model, dtype=cfg.dtype, device=device)
    for turn in ("main", "others"):  # rank 0 first: generated calibration is made once, then read from cache
        if (turn == "main") == dist.is_main:
            calibration = load_calibration(cfg.data, loaded.tokenizer, model=loaded.model, n_samples=cfg.n_samples,
                                           seq_len=cfg.seq_len, seed=cfg.seed, chat_template=cfg.chat_template,
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
    args = _own_options(args, "solve")
    from cboprune.selection.hessian import load_hessian
    from cboprune.core.outputs import check_output_dir
    from cboprune.selection.energy import solve_rankings
    from cboprune.workflows.run import write_solve_outputs
    from cboprune.report.tables import rankings_markdown
    from cboprune.engine.session import check_against_model

    cfg = config_from_args(args, "solve")  # --remove defaults to 4 8, as its help says
    if cfg.energy not in ("fisher", "fisher-linear", "exact"):
        raise CBOPruneError(f"solve builds its energy from the Hessian file: --energy fisher (the paper, default), "
                            f"fisher-linear or exact, not {cfg.energy!r} (use `cboprune run` for it)")
    out_dir = check_output_dir(cfg.output_dir, cfg.overwrite) if cfg.output_dir else None
    if args.export_qubo:
        from cboprune.core.outputs import check_output_file

        if args.export_qubo.endswith(("/", "\\")) or Path(args.export_qubo).is_dir():
            raise CBOPruneError(f"--export-qubo takes a file name prefix such as out/qubo (files PREFIX-M8.json, "
                                f"PREFIX-M8.qubo), not the directory {args.export_qubo}")
        for m in cfg.remove:
            for suffix in (".json", ".qubo"):
                check_output_file(f"{args.export_qubo}-M{m}{suffix}", cfg.overwrite)
    hessian = load_hessian(args.hessian)
    keep = check_against_model(cfg, hessian.n_blocks, hessian.block_kinds if "block_kinds" in hessian.meta else None)
    removable = _removable(hessian, cfg.only, keep)
    rankings = solve_rankings(hessian, cfg.remove, cfg.top, keep=keep, method=cfg.solver, time_limit=cfg.time_limit,
                              node_limit=cfg.node_limit, seed=cfg.seed, removable=removable, energy=cfg.energy)
    print(rankings_markdown(rankings, hessian.block_kinds))
    if out_dir is not None:
        print(f"report: {write_solve_outputs(out_dir, hessian, rankings)}")
    if args.export_qubo:
        from cboprune.selection.energy import from_hessian
        from cboprune.solvers import to_qubo

        energy = from_hessian(hessian, cfg.energy)  # the QUBO of the model that was solved
        for m in cfg.remove:
            from cboprune.core.outputs import staged_file

            qubo = to_qubo(energy.Q, m, linear=energy.linear, keep=keep, removable=removable, k=cfg.top)
            prefix = Path(f"{args.export_qubo}-M{m}")
            for suffix, write in ((".json", qubo.write_json), (".qubo", qubo.write_qubo)):
                with staged_file(Path(f"{prefix}{suffix}"), overwrite=cfg.overwrite) as tmp:
                    write(tmp)
            print(f"QUBO for M={m}: {prefix}.json, {prefix}.qubo")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    args = _own_options(args, "prune")
    from cboprune.selection.hessian import load_hessian
    from cboprune.models import load_model
    from cboprune.models.architectures import decoder_layers
    from cboprune.core.outputs import check_output_dir
    from cboprune.core.distributed import pick_device
    from cboprune.selection.energy import solve_rankings
    from cboprune.workflows.run import provenance, prune_to_checkpoint
    from cboprune.core.ranking import Candidate, Ranking
    from cboprune.engine.session import check_against_model

    if args.output is not None or args.blocks_from is not None:
        from cboprune.gguf.cli import prune_to_gguf

        return prune_to_gguf(args)
    if (args.blocks is None) == (args.hessian is None):
        raise CBOPruneError("pass either --blocks 3,7,12 or --hessian FILE --remove M [--rank R]")
    if args.output_dir is None:
        raise CBOPruneError("pass --output-dir DIR for the pruned checkpoint")
    if args.hessian is not None and (args.remove is None or len(args.remove) != 1):
        raise CBOPruneError("with --hessian pass one --remove M (and optionally --rank R)")
    cfg = config_from_args(args, "prune")
    check_output_dir(cfg.output_dir, cfg.overwrite)
    hessian = load_hessian(args.hessian) if args.hessian else None
    model_spec = args.model or (hessian.meta.get("model") if hessian else None) or "default"
    if hessian is not None:
        keep = check_against_model(cfg, hessian.n_blocks)
        ranking = solve_rankings(hessian, cfg.remove, args.rank + 1, keep=keep,
                                 removable=_removable(hessian, cfg.only, keep))[0]
        if args.rank >= len(ranking.candidates):
            raise CBOPruneError(f"rank {args.rank} does not exist: only {len(ranking.candidates)} states")
        cand = ranking.candidates[args.rank]
        meta, fingerprint = hessian.meta, hessian.fingerprint
    else:
        from cboprune.models.surgery import validate_removal

        validate_removal(args.blocks, 10**9)  # duplicates refused here; the range once the model is known
        cand = Candidate(removed=tuple(sorted(args.blocks)), score=float("nan"), rank=0)
        ranking = Ranking(method="manual", n_blocks=0, n_remove=len(cand.removed), candidates=[cand])
        meta, fingerprint = {}, ""
    if cfg.repair:
        from cboprune.data.calibration import check_data

        check_data(cfg.data)  # before the model loads
    loaded = load_model(model_spec, dtype=cfg.dtype, device=pick_device(cfg.device))
    n_blocks = len(decoder_layers(loaded.model)[1])
    if hessian is not None and hessian.n_blocks != n_blocks:
        raise CBOPruneError(f"the Hessian has {hessian.n_blocks} blocks but model {model_spec!r} has "
                            f"{n_blocks}: pass the --model it was computed on")
    if hessian is None:
        ranking.n_blocks = n_blocks
    info = provenance(cand, ranking, meta, model_spec, fingerprint)
    calibration = None
    if cfg.repair:
        from cboprune.data import load_calibration
        from cboprune.repair import plan_repair

        plan_repair(loaded.model, cand.removed)  # refused in one line before the calibration pass
        calibration = load_calibration(cfg.data, loaded.tokenizer, model=loaded.model, n_samples=cfg.n_samples,
                                       seq_len=cfg.seq_len, seed=cfg.seed, chat_template=cfg.chat_template)
    out = prune_to_checkpoint(loaded.model, loaded.tokenizer, cand.removed, cfg.output_dir, info,
                              copy_model=cfg.speedup, overwrite=cfg.overwrite, save_dtype=cfg.save_dtype,
                              speedup=cfg.speedup, repair=cfg.repair, calibration=calibration,
                              batch_size=cfg.batch_size)
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


def cmd_methods(args: argparse.Namespace) -> int:
    args = _own_options(args, "methods")
    import json

    from cboprune.core import methods

    if args.json:
        print(json.dumps([{"name": m.name, "label": m.label, "kind": m.kind, "summary": m.summary,
                           "needs": list(m.needs), "cost": m.cost_formula, "reference": m.reference}
                          for m in methods.methods()], indent=2))
    else:
        print(methods.method_table())
    return 0


def cmd_archs(args: argparse.Namespace) -> int:
    args = _own_options(args, "archs")
    import json

    from cboprune.models.architectures import KIND_PARTS, describe, supported_architectures

    if args.model:
        from cboprune.models import load_model

        from cboprune.models.architectures import gating_summary

        model = load_model(args.model, dtype=args.dtype, device="cpu", tokenizer=False).model
        rows = describe(model)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"gating: {gating_summary(model)}\n")
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


def _hub_settings(args: argparse.Namespace) -> dict:
    """--trust-remote-code / --revision of this command, from its flags or its --config YAML."""
    yaml = read_yaml(args.config) if getattr(args, "config", None) else {}
    return {name: getattr(args, name, None) if getattr(args, name, None) is not None else yaml.get(name)
            for name in HUB_FIELDS if hasattr(args, name)}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)
    try:
        hub = _hub_settings(args)
        if any(hub.values()):
            from cboprune.models.loading import hub_options

            with hub_options(**hub):
                return args.func(args)
        return args.func(args)
    except CBOPruneError as exc:
        print(f"cboprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cboprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
