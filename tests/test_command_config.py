"""heal, eval, repair, bench and export take `--config FILE.yaml` like run/compare/study: every flag and
YAML key comes from one declaration (cboprune.core.options), a required option may come from the file,
the command line wins, an unknown key or a wrong kind is one line. Shared options read as Config's."""

from __future__ import annotations

import importlib
from dataclasses import fields

import pytest

from cboprune.bench.cli import BenchOptions
from cboprune.cli import build_parser, main
from cboprune.core.config import Config
from cboprune.evaluation.cli import EvalOptions
from cboprune.gguf.cli import ExportOptions
from cboprune.heal.recipe import HealConfig
from cboprune.core.options import build, default_of, field_of
from cboprune.repair.cli import RepairOptions

CASES = {  # command -> (options class, argv without --config, YAML key, YAML value, the same option as a flag)
    "heal": (HealConfig, ["heal", "student", "--teacher", "t"], "learning_rate", 1e-3, ["--lr", "2e-3"]),
    "eval": (EvalOptions, ["eval"], "batch_size", 4, ["--batch-size", "2"]),
    "repair": (RepairOptions, ["repair", "src", "--output-dir", "o"], "ridge", 0.5, ["--ridge", "0.25"]),
    "bench": (BenchOptions, ["bench", "a", "b"], "repeats", 2, ["--repeats", "7"]),
    "export": (ExportOptions, ["export", "ck", "--output", "x.gguf"], "outtype", "f16", ["--outtype", "bf16"]),
}


def _build(command, argv):
    return build(CASES[command][0], build_parser().parse_args(argv), command)


@pytest.mark.parametrize("command", sorted(CASES))
def test_the_yaml_file_supplies_options_and_the_command_line_wins(command, tmp_path):
    _, argv, key, value, flag = CASES[command]
    cfg = tmp_path / "c.yaml"
    extra = "data: d.jsonl\noutput_dir: out\n" if command == "heal" else ""  # required options from the file
    cfg.write_text(f"{key}: {value}\n{extra}")
    opts = _build(command, [*argv, "--config", str(cfg)])
    assert getattr(opts, key) == value
    if command == "heal":
        assert opts.data == "d.jsonl" and opts.output_dir == "out"
    assert getattr(_build(command, [*argv, "--config", str(cfg), *flag]), key) not in (value, None)
    # without the file, the declared default
    if command != "heal":
        assert getattr(_build(command, argv), key) == default_of(field_of(CASES[command][0], key))


def test_an_unknown_key_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_sise: 4\n")
    assert main(["eval", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config keys ['batch_sise']" in err[0] and "'batch_size'" in err[0]


@pytest.mark.parametrize("yaml_text, fragment", [("repeats: many\n", "--repeats must be an integer"),
                                                 ("batch_sizes: 1,x\n", "--batch-sizes"),
                                                 ("engine: onnx\n", "--engine must be one of torch, llama.cpp")])
def test_a_wrong_value_in_the_file_is_one_line_before_any_work(yaml_text, fragment, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert main(["bench", "a", "b", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_a_missing_required_option_is_one_line(tmp_path, capsys):
    student = tmp_path / "student"
    student.mkdir()
    assert main(["heal", str(student), "--teacher", "t"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data is required" in err[0] and "--output-dir is required" in err[0], err


def test_shared_options_read_as_config_defines_them():
    """One declaration, one default and one help text: the commands' copies of Config's options."""
    config = {f.name: f for f in fields(Config)}
    for cls, name, source in [(EvalOptions, "batch_size", "eval_batch_size"), (EvalOptions, "device", "device"),
                              (RepairOptions, "batch_size", "batch_size"), (RepairOptions, "device", "device"),
                              (RepairOptions, "seq_len", "seq_len"), (EvalOptions, "seed", "seed")]:
        f = field_of(cls, name)
        assert (f.default, f.metadata["help"]) == (config[source].default, config[source].metadata["help"])
    from cboprune.heal.recipe import GLOBAL_BATCH_SIZE, LEARNING_RATE, MICRO_BATCH_SIZE, SEQ_LEN
    heal = {f.name: f.default for f in fields(HealConfig)}
    assert (heal["learning_rate"], heal["micro_batch_size"], heal["global_batch_size"], heal["seq_len"]) == (
        LEARNING_RATE, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, SEQ_LEN)
    assert (config["heal_lr"].default, config["heal_micro_batch_size"].default) == (LEARNING_RATE, MICRO_BATCH_SIZE)


def test_every_flag_of_the_option_commands_is_generated_from_a_declaration():
    """No hand-made flag: each option of heal/eval/repair/bench/export is a declared field (or one of the
    flags every model-loading command shares, or --config)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for command, (cls, *_rest) in CASES.items():
        declared = {f.name for f in fields(cls)} | {"trust_remote_code", "revision", "config", "help"}
        dests = {a.dest for a in sub[command]._actions}
        assert dests <= declared, (command, sorted(dests - declared))


def test_every_flag_of_every_command_is_a_declared_option():
    """Not one hand-made flag anywhere: each flag of each subcommand is a field of Config, of the command's
    own option class, or --config / --help."""
    from cboprune import cli
    from cboprune.core.config import Config

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    own = {name: cls for name, cls in cli._OWN_OPTIONS.items()}
    own.update({name: getattr(importlib.import_module(module), cls) for name, _, module, cls, _ in cli._MODULE_COMMANDS})
    for command, p in sub.items():
        declared = {f.name for f in fields(Config)} | {"config", "help"}
        if command in own:
            declared |= {f.name for f in fields(own[command])}
        dests = {a.dest for a in p._actions}
        assert dests <= declared, (command, sorted(dests - declared))
    assert {"hessian", "solve", "prune", "archs", "methods"} <= set(own)


def test_a_command_s_own_options_are_checked_in_one_line(capsys):
    from cboprune.cli import main

    assert main(["prune", "--blocks", "1", "--rank", "-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--rank must be at least 0, got -2" in err
    assert main(["solve"]) == 2
    assert "--hessian is required" in capsys.readouterr().err
