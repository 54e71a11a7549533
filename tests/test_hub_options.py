"""--trust-remote-code and --revision on every command that loads a model: off by default, passed to
every transformers load of the command, refused in one line where they cannot apply."""

from __future__ import annotations

import pytest

from cboprune.cli import build_parser, main
from cboprune.models import loading

LOADS_A_MODEL = {  # command -> the shortest argv it parses with
    "run": ["run"], "hessian": ["hessian"], "compare": ["compare"], "study": ["study"], "prune": ["prune"],
    "heal": ["heal", "student", "--data", "d.jsonl", "--output-dir", "o"], "eval": ["eval"], "repair": ["repair", "src", "--output-dir", "o"],
    "bench": ["bench", "a"], "export": ["export", "ck", "--output", "x.gguf"],
}


@pytest.mark.parametrize("command", sorted(LOADS_A_MODEL))
def test_every_command_that_loads_a_model_takes_both_flags_off_by_default(command):
    parser = build_parser()
    plain = parser.parse_args(LOADS_A_MODEL[command])
    assert not plain.trust_remote_code and plain.revision is None
    given = parser.parse_args([*LOADS_A_MODEL[command], "--trust-remote-code", "--revision", "v1.0"])
    assert given.trust_remote_code is True and given.revision == "v1.0"


def test_the_settings_reach_every_load_and_are_restored():
    assert loading._pretrained_kwargs(None, False)["trust_remote_code"] is False
    assert "revision" not in loading._pretrained_kwargs(None, False)
    with loading.hub_options(trust_remote_code=True, revision="abc123"):
        kw = loading._pretrained_kwargs(None, False)
        assert kw["trust_remote_code"] is True and kw["revision"] == "abc123"
        assert "revision" not in loading._pretrained_kwargs("/a/local/dir", False)  # local files have no revisions
    assert loading._pretrained_kwargs(None, False)["trust_remote_code"] is False


def test_the_command_passes_them_to_transformers(tiny_checkpoint, tmp_path, monkeypatch):
    import transformers

    seen = []
    original = transformers.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    for flag, expected in (([], False), (["--trust-remote-code"], True)):
        seen.clear()
        assert main(["-q", "prune", "--model", str(tiny_checkpoint), "--blocks", "1", "--no-speedup",
                     "--output-dir", str(tmp_path / f"out{len(flag)}"), *flag]) == 0
        assert seen and set(seen) == {expected}
    assert loading._HUB["trust_remote_code"] is False  # nothing leaks into the next command


def test_a_revision_of_a_local_checkpoint_is_one_line(tiny_checkpoint, tmp_path, capsys):
    code = main(["prune", "--model", str(tiny_checkpoint), "--blocks", "1", "--revision", "v2",
                 "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--revision" in err[0] and not (tmp_path / "out").exists()
