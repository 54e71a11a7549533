"""heal, eval, repair, bench and export take `--config FILE.yaml` like run/compare/study: its keys are
the command's flags with underscores, a required flag may come from the file, the command line wins,
an unknown key is one line. Their shared options read as Config's (one default, one help)."""

from __future__ import annotations

import pytest

from cboprune.cli import _preload_yaml, build_parser, main
from cboprune.config import option_default, option_help

CASES = {  # command -> (argv without --config, YAML key, YAML value, the same flag on the command line)
    "heal": (["heal", "student"], "learning_rate", 1e-3, ["--lr", "2e-3"]),
    "eval": (["eval"], "batch_size", 4, ["--batch-size", "2"]),
    "repair": (["repair", "src", "--output-dir", "o"], "ridge", 0.5, ["--ridge", "0.25"]),
    "bench": (["bench", "a", "b"], "repeats", 2, ["--repeats", "7"]),
    "export": (["export", "ck", "--output", "x.gguf"], "overwrite", True, ["--overwrite"]),
}


def _parse(argv):
    parser = build_parser()
    _preload_yaml(parser, argv)
    return parser.parse_args(argv)


@pytest.mark.parametrize("command", sorted(CASES))
def test_the_yaml_file_supplies_flags_and_the_command_line_wins(command, tmp_path):
    argv, key, value, flag = CASES[command]
    cfg = tmp_path / "c.yaml"
    extra = "data: d.jsonl\noutput_dir: out\n" if command == "heal" else ""  # required flags from the file
    cfg.write_text(f"{key}: {value}\n{extra}")
    args = _parse([*argv, "--config", str(cfg)])
    assert getattr(args, key) == value
    if command == "heal":
        assert args.data == "d.jsonl" and args.output_dir == "out"
    if command != "export":
        assert getattr(args, key) != getattr(_parse([*argv, "--config", str(cfg), *flag]), key)


def test_an_unknown_key_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_sise: 4\n")
    assert main(["eval", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config keys ['batch_sise']" in err[0] and "batch_size" in err[0]


def test_shared_options_read_as_config_defines_them():
    parser = build_parser()
    sub = parser.module_parsers
    actions = {name: {a.dest: a for a in p._actions} for name, p in sub.items()}
    assert actions["eval"]["batch_size"].default == option_default("eval_batch_size")
    assert actions["repair"]["batch_size"].default == option_default("batch_size")
    for name in ("eval", "repair"):
        assert actions[name]["device"].help == option_help("device")
    from cboprune.heal.recipe import GLOBAL_BATCH_SIZE, LEARNING_RATE, MICRO_BATCH_SIZE, SEQ_LEN
    heal = actions["heal"]
    assert (heal["learning_rate"].default, heal["micro_batch_size"].default, heal["global_batch_size"].default,
            heal["seq_len"].default) == (LEARNING_RATE, MICRO_BATCH_SIZE, GLOBAL_BATCH_SIZE, SEQ_LEN)
    assert option_default("heal_lr") == LEARNING_RATE and option_default("heal_micro_batch_size") == MICRO_BATCH_SIZE
