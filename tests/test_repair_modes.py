"""`--repair linear` as a mode of prune and compare: the saved checkpoint is the folded repair, and
every configuration of a comparison is evaluated repaired beside unrepaired (and healed from it)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cboprune.cli import main


def test_prune_with_repair_saves_the_folded_model(tiny_checkpoint, shared_data, tmp_path):
    from transformers import AutoModelForCausalLM

    data = str(shared_data / "calib" / "alpaca_en_demo.json")
    common = ["-q", "prune", "--model", str(tiny_checkpoint), "--blocks", "2,3", "--no-speedup"]
    assert main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    assert main([*common, "--repair", "linear", "--data", data, "--n-samples", "4", "--seq-len", "32",
                 "--output-dir", str(tmp_path / "rep")]) == 0
    prov = json.loads((tmp_path / "rep" / "removal.json").read_text())
    assert prov["removed"] == [2, 3] and prov["repair"]["method"] == "linear"
    assert prov["repair"]["runs"][0]["removed"] == [2, 3] and prov["repair"]["calibration"]["n_samples"] == 4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    rep = AutoModelForCausalLM.from_pretrained(tmp_path / "rep")
    assert rep.config.num_hidden_layers == 4
    # the fold changes exactly the kept block before the gap (block 1, now index 1)
    assert not torch.equal(plain.model.layers[1].mlp.down_proj.weight, rep.model.layers[1].mlp.down_proj.weight)
    assert torch.equal(plain.model.layers[2].mlp.down_proj.weight, rep.model.layers[2].mlp.down_proj.weight)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert rep.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_prune_repair_bad_input_is_one_line(tiny_checkpoint, tmp_path, capsys):
    rc = main(["-q", "prune", "--model", str(tiny_checkpoint), "--blocks", "2", "--repair", "cubic",
               "--output-dir", str(tmp_path / "x")])
    assert rc != 0
    err = capsys.readouterr().err.strip()
    assert "--repair must be 'linear'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_compare_with_repair_evaluates_and_heals_every_configuration_repaired(tiny_checkpoint, shared_data, tmp_path):
    out = tmp_path / "cmp"
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. It was a sunny day, and the children played in the park. " * 3)
    rc = main(["-q", "compare", "--model", str(tiny_checkpoint), "--data",
               str(shared_data / "calib" / "alpaca_en_demo.json"), "--n-samples", "4", "--seq-len", "32",
               "--batch-size", "4", "--remove", "2", "--methods", "bi,last-m", "--tasks", f"file:{text}",
               "--ppl-limit", "1", "--max-length", "64", "--no-speedup", "--repair", "linear",
               "--heal-steps", "2", "--heal-seq-len", "32", "--heal-micro-batch-size", "2",
               "--heal-global-batch-size", "2", "--heal-lr", "1e-3", "--heal-heldout-samples", "8",
               "--output-dir", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    rows = [e for e in data["entries"] if e["same_as"] is None]
    assert rows and all(e["repaired"] is not None for e in rows)
    for e in rows:  # repaired NLL is measured on the same samples, and the fit beats plain removal
        assert e["repaired"]["nll"] != pytest.approx(math.log(e["calib_ppl"]), abs=1e-6)
        assert all(r["fit_error"] < r["identity_error"] for r in e["repaired"]["runs"])
        # healed twice with one recipe: from plain removal and from the repair, different starts
        assert set(e["healed"]) == {"2"} and set(e["repair_healed"]) == {"2"}
        assert e["repair_healed"]["2"]["heal_ce_before"] != pytest.approx(e["healed"]["2"]["heal_ce_before"])
        assert e["repair_healed"]["2"]["start"] == "repaired" and e["healed"]["2"]["start"] == "pruned"
    cache = out.with_name(out.name + ".heal-cache")
    assert len(list(cache.glob("*.json"))) == 2 * len(rows)
    page = (out / "repair.md").read_text()
    assert "NLL repaired" in page and "last" in page.lower() and "NLL repair + heal 2" in page


def test_run_with_repair_saves_repaired_checkpoints_and_reports_them(tiny_checkpoint, shared_data, tmp_path):
    out = tmp_path / "run"
    assert main(["-q", "run", "--model", str(tiny_checkpoint), "--data",
                 str(shared_data / "calib" / "alpaca_en_demo.json"), "--n-samples", "6", "--heldout-samples", "2",
                 "--seq-len", "32", "--remove", "2", "--no-speedup", "--repair", "linear", "--heal-candidates", "0",
                 "--output-dir", str(out)]) == 0
    prov = json.loads((out / "pruned" / "M2-rank0" / "removal.json").read_text())
    assert prov["repair"]["calibration"]["n_samples"] == 6  # fitted on the fitting samples only
    assert "Repaired without training" in (out / "report.md").read_text()
