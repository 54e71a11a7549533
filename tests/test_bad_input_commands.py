"""Bad input to solve / compare / study / run: one `cboprune: error:` line, exit status 2, no
traceback, the output location unchanged, before any expensive work (tiny model, seconds each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cboprune.cli import main

from conftest import save_tiny_checkpoint


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from cboprune.selection.hessian import HESSIAN_FORMAT, HessianResult, save_hessian

    root = tmp_path_factory.mktemp("assets")
    ck = save_tiny_checkpoint(root / "model", n_layers=6)
    rng = np.random.default_rng(0)
    hessian = save_hessian(HessianResult(A=rng.normal(size=(12, 6)), losses=rng.random(12),
                                         meta={"model": str(ck), "block_kinds": ["attention+mlp"] * 6,
                                               "format": HESSIAN_FORMAT, "n_blocks": 6}),
                           root / "h.safetensors")
    (root / "garbage.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81 binary")
    (root / "unknown.yaml").write_text("remove: [2]\nbogus_key: 1\n")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("user data")
    (root / "afile").write_text("x")
    (root / "heal.jsonl").write_text("".join('{"text": "a short record for healing number %d"}\n' % i
                                             for i in range(8)))
    return {"ck": str(ck), "h": str(hessian), "root": root, "heal_data": str(root / "heal.jsonl")}


def _cases(a):
    ck, h, r = a["ck"], a["h"], a["root"]
    solve = ["solve", "--hessian", h]
    cmp_ = ["compare", "--model", ck, "--seq-len", "32", "--methods", "bi", "--remove", "2"]
    study = ["study", "--model", ck, "--seq-len", "32", "--peers", "bi", "--energies", "fisher", "--remove", "2"]
    run = ["run", "--model", ck, "--seq-len", "32", "--remove", "2"]
    out = str(r / "new-out")
    return {
        "solve top 0": (solve + ["--remove", "2", "--top", "0"], "--top must be a positive integer"),
        "solve default remove too large": (solve, "removes the whole model"),
        "solve remove 0": (solve + ["--remove", "0"], "M >= 1"),
        "solve M too large": (solve + ["--remove", "6"], "below N = 6"),
        "solve measured energy": (solve + ["--remove", "2", "--energy", "measured"], "fisher-linear or exact"),
        "solve unknown energy": (solve + ["--remove", "2", "--energy", "curvature"], "energy must be one of"),
        "solve missing hessian": (["solve", "--hessian", str(r / "none.safetensors"), "--remove", "2"], "not found"),
        "solve garbage hessian": (["solve", "--hessian", str(r / "garbage.safetensors"), "--remove", "2"], ""),
        "solve into non-empty dir": (solve + ["--remove", "2", "--output-dir", str(r / "full")], "not empty"),
        "solve into a file": (solve + ["--remove", "2", "--output-dir", str(r / "afile")], "is a file"),
        "solve qubo into a dir": (solve + ["--remove", "2", "--export-qubo", str(r / "full") + "/"], "directory"),
        "compare unknown method": (cmp_[:-4] + ["--methods", "bi,sleeb", "--remove", "2", "--output-dir", out],
                                   "did you mean 'sleb'"),
        "compare heal steps 0": (cmp_ + ["--heal-steps", "0", "--output-dir", out], "--heal-steps"),
        "compare heal without data": (cmp_ + ["--heal-steps", "3", "--output-dir", out], "distillation data"),
        "compare heal beyond the context": (cmp_ + ["--heal-steps", "3", "--heal-data", a["heal_data"],
                                                    "--heal-seq-len", "4096", "--output-dir", out],
                                            "--heal-seq-len 4096 exceeds the model's context of 128"),
        "compare missing heal data": (cmp_ + ["--heal-steps", "3", "--heal-data", str(r / "none.jsonl"),
                                               "--output-dir", out], "healing data not found"),
        "compare limit 0": (cmp_ + ["--limit", "0", "--output-dir", out], "--limit"),
        "compare into cwd": (cmp_ + ["--output-dir", ".", "--overwrite"], "current directory"),
        "compare device gpu": (cmp_ + ["--device", "gpu", "--output-dir", out], "device"),
        "compare missing data": (cmp_ + ["--data", str(r / "none.jsonl"), "--output-dir", out], "not found"),
        "compare seq-len beyond context": (cmp_[:3] + ["--seq-len", "4096", "--methods", "bi", "--remove", "2",
                                                       "--output-dir", out], "context"),
        "study diverse 1.5": (study + ["--diverse", "1.5", "--output-dir", out], "--diverse"),
        "study refine sweeps -1": (study + ["--refine-sweeps", "-1", "--output-dir", out], "--refine-sweeps"),
        "study top 0": (study + ["--top", "0", "--output-dir", out], "--top"),
        "study unknown energy": (study[:-4] + ["--energies", "fisher,curvature", "--remove", "2", "--output-dir", out],
                                 "unknown energy model"),
        "study heal states without steps": (study + ["--heal-states", "3", "--output-dir", out], "--heal-steps"),
        "run unknown yaml key": (["run", "--config", str(r / "unknown.yaml"), "--output-dir", out],
                                 "unknown config keys ['bogus_key']"),
        "run binary yaml": (["run", "--config", str(r / "binary.yaml"), "--output-dir", out], "not valid YAML"),
        "run heal candidates without data": (run + ["--heal-candidates", "2", "--output-dir", out],
                                             "distillation data"),
        "run heal candidates on hub data": (run + ["--heal-candidates", "2", "--data", "someone/a-hub-dataset",
                                                    "--output-dir", out], "--heal-candidates heals on a local file"),
        "study heal candidates without data": (study + ["--heal-candidates", "2", "--output-dir", out],
                                               "distillation data"),
        "run judge steps 0": (run + ["--judge-steps", "0", "--output-dir", out], "--judge-steps must be"),
        "run two heal budgets": (run + ["--heal", "--heal-steps", "3", "4", "--data", h, "--output-dir", out],
                                 "one --heal-steps"),
        "run into non-empty dir": (run + ["--output-dir", str(r / "full")], "not empty"),
        "run keep outside the model": (run + ["--keep", "9", "--output-dir", out], "keep index 9 is outside"),
        "run only an absent kind": (run + ["--only", "mamba", "--output-dir", out], "no block of kind 'mamba'"),
    }


CASES = list(_cases({"ck": "", "h": "", "root": Path("/"), "heal_data": ""}))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_before_any_work(name, assets, capsys, monkeypatch):
    import cboprune.data

    def no_calibration(*args, **kwargs):  # without --data, calibration is minutes of generation
        raise AssertionError("calibration was built before the input was checked")

    monkeypatch.setattr(cboprune.data, "load_calibration", no_calibration)
    argv, fragment = _cases(assets)[name]
    before = _snapshot(assets["root"])
    rc = main(["-q", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, (name, err)
    assert len(err.splitlines()) == 1 and err.startswith("cboprune: error:"), err
    assert "Traceback" not in err and fragment in err, err
    assert _snapshot(assets["root"]) == before  # nothing written, nothing removed
