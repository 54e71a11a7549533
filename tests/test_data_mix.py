"""Calibration as a weighted mix of sources (cboprune.data.mix): parsing, proportions, domains of the
held-out part, and bad mixes refused in one line before any model loads."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from cboprune.data.mix import allocate, interleave, is_mix, parse_mix, sample_domains
from cboprune.core.errors import CBOPruneError

from conftest import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from cboprune.models.loading import resolve_model_source

    return AutoTokenizer.from_pretrained(resolve_model_source("default")[0])


@pytest.fixture
def files(tmp_path):
    chats = tmp_path / "a.jsonl"
    chats.write_text("".join(json.dumps({"instruction": f"Question {i}: what is {i} plus {i}? Explain it.",
                                         "output": f"It is {2 * i}, because {i} and {i} make {2 * i} together."})
                             + "\n" for i in range(40)))
    text = tmp_path / "b.txt"
    text.write_text(" ".join(f"Sentence number {i} of a plain text document about rivers and hills." for i in range(300)))
    return chats, text


def test_parse_normalizes_weights_and_knows_a_path_from_a_mix(files):
    a, b = files
    sources = parse_mix(f"{a}:0.7,{b}:0.3")
    assert [s.spec for s in sources] == [str(a), str(b)]
    assert [s.weight for s in sources] == pytest.approx([0.7, 0.3])
    assert [s.weight for s in parse_mix(f"{a}:2,generated:2")] == [0.5, 0.5]
    assert parse_mix(f"{a}:2,generated:2")[1].generated
    assert is_mix(f"{a}:1") and not is_mix(str(a)) and not is_mix(None) and not is_mix("org/dataset")


def test_allocation_and_interleaving_keep_every_prefix_in_proportion():
    assert allocate([0.7, 0.3], 10) == [7, 3]
    assert allocate([0.5, 0.5, 1e-9], 10) == [5, 4, 1]
    assert min(allocate([0.98, 0.01, 0.01], 6)) == 1  # every source gets a sample
    order = interleave([6, 2])
    assert sorted(order) == [(0, k) for k in range(6)] + [(1, 0), (1, 1)]
    first_half = Counter(i for i, _ in order[:4])
    assert first_half == {0: 3, 1: 1}


def test_a_mix_loads_each_source_as_it_would_alone_and_splits_across_domains(files, tokenizer):
    from cboprune.data.calibration import load_calibration

    a, b = files
    mix = load_calibration(f"{a}:0.5,{b}:0.5", tokenizer, n_samples=8, seq_len=32, seed=1)
    assert mix.input_ids.shape == (8, 32) and mix.info["kind"] == "mix"
    assert Counter(mix.info["domains"]) == {"a": 4, "b": 4}
    alone = load_calibration(str(a), tokenizer, n_samples=4, seq_len=32, seed=1)
    rows = [r for r, d in enumerate(mix.info["domains"]) if d == "a"]
    assert (mix.input_ids[rows] == alone.input_ids).all()
    fit, held = mix.split(6)
    assert set(sample_domains(held)) == {"a", "b"} and len(sample_domains(fit)) == 6
    other = load_calibration(f"{a}:0.75,{b}:0.25", tokenizer, n_samples=8, seq_len=32, seed=1)
    assert Counter(other.info["domains"]) == {"a": 6, "b": 2} and other.fingerprint != mix.fingerprint


def test_domain_losses_take_the_mean_apart(files, tokenizer):
    from cboprune.data.calibration import load_calibration
    from cboprune.selection.verify import domain_losses
    from cboprune.models.masked import calibration_nll

    from conftest import tiny_llama

    a, b = files
    model = tiny_llama(vocab_size=len(tokenizer))
    mix = load_calibration(f"{a}:0.5,{b}:0.5", tokenizer, n_samples=6, seq_len=32)
    per = domain_losses(model, mix, batch_size=4)
    assert set(per) == {"a", "b"} and per["a"] != per["b"]
    lo, hi = sorted(per.values())
    assert lo <= calibration_nll(model, mix, batch_size=4) <= hi
    assert domain_losses(model, load_calibration(str(a), tokenizer, n_samples=4, seq_len=32)) is None


@pytest.mark.parametrize("spec, fragment", [
    ("{a}:0.5,{a}:0.5", "listed twice"),
    ("{a}:0,{b}:1", "not a positive number"),
    ("{a}:-1,{b}:1", "not a positive number"),
    ("{a}:nan,{b}:1", "not a positive number"),
    ("{a}:0.5,{b}", "has no weight"),
    ("{a}:0.5,{d}/missing.jsonl:0.5", "is not a file"),
    (",", "empty mix"),
    ("{a}:0.5,,{b}:0.5", "an empty entry"),
])
def test_bad_mixes_are_one_line_errors(spec, fragment, files):
    a, b = files
    with pytest.raises(CBOPruneError, match=fragment) as info:
        parse_mix(spec.format(a=a, b=b, d=a.parent))
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", n_layers=5)


def test_run_with_a_users_own_mix(files, tiny_checkpoint, tmp_path):
    from cboprune.cli import main

    a, b = files
    out = tmp_path / "run"
    rc = main(["-q", "run", "--model", str(tiny_checkpoint), "--data", f"{a}:0.7,{b}:0.3", "--n-samples", "8",
               "--heldout-samples", "4", "--seq-len", "32", "--batch-size", "4", "--remove", "2", "--top", "3",
               "--no-speedup", "--output-dir", str(out)])
    assert rc == 0
    meta = json.loads((out / "rankings" / "M2.json").read_text())
    text = json.dumps(meta)
    assert "mix(" in text  # the calibration's source names the mix


@pytest.mark.parametrize("mix, fragment", [
    ("{a}:0.7,{b}:x", "not a positive number"),
    ("{a}:0.7,{d}/none.txt:0.3", "is not a file"),
    ("{a}:0.7,{a}:0.3", "listed twice"),
])
def test_a_bad_mix_stops_run_before_the_model_loads(mix, fragment, files, tmp_path, capsys, monkeypatch):
    import cboprune.models

    from cboprune.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the mix was checked")

    monkeypatch.setattr(cboprune.models, "load_model", no_model)
    a, b = files
    rc = main(["-q", "run", "--model", "default", "--data", mix.format(a=a, b=b, d=a.parent), "--remove", "2",
               "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "out").exists()


def test_healing_on_a_mix_needs_its_own_heal_data(files, tmp_path, capsys):
    from cboprune.cli import main

    a, b = files
    rc = main(["-q", "study", "--model", "default", "--data", f"{a}:0.5,{b}:0.5", "--remove", "2",
               "--heal-steps", "1", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "pass --heal-data FILE" in err, err


def test_verification_on_a_mix_ranks_by_the_mean_and_reports_every_domain(files, tokenizer):
    """The held-out part of a mix is measured per domain: the token-weighted mean is the plain
    verification's number (the same order), and each state's worst domain is kept beside it."""
    import numpy as np

    from cboprune.data.calibration import load_calibration
    from cboprune.selection.verify import domain_losses
    from cboprune.models.masked import configurations_nll
    from cboprune.core.ranking import Candidate, Ranking
    from cboprune.selection.verify import verify

    from conftest import tiny_llama

    a, b = files
    model = tiny_llama(vocab_size=len(tokenizer))
    _, held = load_calibration(f"{a}:0.5,{b}:0.5", tokenizer, n_samples=12, seq_len=32).split(4)
    states = [(0, 1), (2, 3), (4, 5), (1, 4)]
    ranking = Ranking("x", 6, 2, [Candidate(s, float(r), r) for r, s in enumerate(states)])
    verified = verify(model, held, ranking, batch_size=4)
    plain = configurations_nll(model, held, states, batch_size=4)
    assert [c.removed for c in verified.candidates] == [states[i] for i in np.argsort(plain, kind="stable")]
    assert [c.score for c in verified.candidates] == pytest.approx(sorted(plain), abs=1e-5)
    info = verified.info["verification"]
    assert set(info["domains"]) == {"a", "b"}
    best = verified.candidates[0].removed
    direct = domain_losses(model, held, batch_size=4, removed=best)
    assert [info["domains"][n][0] for n in ("a", "b")] == pytest.approx([direct["a"], direct["b"]], abs=1e-5)
    assert info["worst_domain"][0] == max(direct, key=direct.get)
