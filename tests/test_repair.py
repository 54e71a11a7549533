"""Linear repair: exact folding, the fit it reports, reload + generation, refusals."""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import torch

from cboprune.data import CalibrationSet
from cboprune.core.errors import CBOPruneError
from cboprune.models.architectures import decoder_layers
from cboprune.models.surgery import remove_blocks, save_pruned
from cboprune.repair import plan_repair, removed_runs, repair_linear
from cboprune.repair.linear import collect_moments, solve_map
from conftest import tiny_llama


def tiny_gpt2(n_layers: int = 6):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=n_layers, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_proj.weight.mul_(8.0)
            block.mlp.c_proj.bias.normal_()
    return model


def tiny_phi(n_layers: int = 6):
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                       num_attention_heads=4, max_position_embeddings=64)
    return PhiForCausalLM(config).eval()


def tiny_granite(n_layers: int = 6):
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    config = GraniteConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=2, residual_multiplier=0.5)
    return GraniteForCausalLM(config).eval()


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "phi": tiny_phi, "granite": tiny_granite}


def random_calibration(n: int = 6, seq: int = 16, seed: int = 1, vocab: int = 128) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq - 5:] = 0  # one right-padded sample: padding must not enter the fit
    return CalibrationSet(ids, mask, "random")


def explicit_reference(model, removed, calibration, ridge=1e-4, objective="lstsq"):
    """The model with the blocks removed and each run's map inserted explicitly in the residual stream
    (hooks, no weight change): after block p, h -> h + d (T - I) with d its FFN projection's contribution;
    for a run starting at block 0, the first kept block's input h -> h T."""
    ref = copy.deepcopy(model)
    plan = plan_repair(ref, removed)
    moments = collect_moments(ref, plan, calibration, objectives=(objective,))
    maps = [solve_map(moments[(run, objective)], ridge) for run in plan.runs]
    _, layers = decoder_layers(ref)
    kept = [i for i in range(len(layers)) if i not in set(removed)]
    captured = {}
    for run, names, T in zip(plan.runs, plan.fold, maps):
        T = T.float()
        if run.first == 0:
            layers[kept[0]].register_forward_pre_hook(
                lambda m, args, kwargs, T=T: ((args[0] @ T, *args[1:]), kwargs) if args
                else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] @ T}), with_kwargs=True)
            continue
        p = run.first - 1
        ref.get_submodule(names[0]).register_forward_hook(lambda m, a, out, p=p: captured.__setitem__(p, out))

        def after_block(module, args, out, p=p, T=T):
            h = out[0] if isinstance(out, tuple) else out
            d = plan.scale * captured[p]
            h = h + d @ T - d
            return (h, *out[1:]) if isinstance(out, tuple) else h

        layers[p].register_forward_hook(after_block)
    remove_blocks(ref, removed)
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("removed", [[2, 3], [0, 1, 4]])
def test_folding_is_exact(family, removed):
    model = FAMILIES[family]()
    calib = random_calibration()
    ref = explicit_reference(model, removed, calib)
    plain = remove_blocks(copy.deepcopy(model), removed)
    repaired, info = repair_linear(model, removed, calib)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    out, want = logits(repaired, ids), logits(ref, ids)
    assert (out - want).abs().max() < 1e-5 * want.abs().max().clamp_min(1)
    assert (out - logits(plain, ids)).abs().max() > 1e-3  # the repair changed something
    assert [r["removed"] for r in info["runs"]] == [[r.first + k for k in range(r.last - r.first + 1)]
                                                    for r in removed_runs(removed)]


def _real_rows(h, mask):
    return h[mask.bool()].double()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reported_error_is_the_error_of_the_repaired_state(family):
    """fit_error equals the relative error of the repaired model's state after the gap, measured
    independently from output_hidden_states; plain removal's equals identity_error; the fit is better."""
    model, removed = FAMILIES[family](), [2, 3]
    calib = random_calibration()
    ids, mask = calib.input_ids, calib.attention_mask

    def state(m, i):  # [n, D] real tokens of the state entering block i (block i-1's output)
        with torch.no_grad():
            return _real_rows(m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[i], mask)

    target = state(model, 4)
    before = state(remove_blocks(copy.deepcopy(model), removed), 2)
    repaired, info = repair_linear(model, removed, calib, ridge=0.0)
    after = state(repaired, 2)
    run = info["runs"][0]
    rel = lambda h: float((h - target).pow(2).sum() / target.pow(2).sum())  # noqa: E731
    assert run["n_tokens"] == int(mask.sum())
    assert rel(after) == pytest.approx(run["fit_error"], rel=1e-3, abs=1e-7)
    assert rel(before) == pytest.approx(run["identity_error"], rel=1e-3, abs=1e-7)
    assert run["fit_error"] < run["identity_error"]


def test_cosine_objective_differs_and_is_exact():
    model, removed = tiny_llama(), [3, 4]
    calib = random_calibration()
    ref = explicit_reference(model, removed, calib, objective="cosine")
    a, info_a = repair_linear(copy.deepcopy(model), removed, calib, objective="cosine")
    b, _ = repair_linear(model, removed, calib, objective="lstsq")
    ids = calib.input_ids[:2]
    assert (logits(a, ids) - logits(ref, ids)).abs().max() < 1e-4
    assert (logits(a, ids) - logits(b, ids)).abs().max() > 1e-4
    assert info_a["objective"] == "cosine"


def test_tied_embeddings_are_untied_when_run_starts_at_block_zero(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    calib = random_calibration()
    ref = explicit_reference(model, [0, 1], calib)
    head_before = model.lm_head.weight.detach().clone()
    repaired, _ = repair_linear(model, [0, 1], calib)
    assert torch.equal(repaired.lm_head.weight, head_before)
    ids = calib.input_ids[:2]
    assert (logits(repaired, ids) - logits(ref, ids)).abs().max() < 1e-5 * logits(ref, ids).abs().max()
    save_pruned(repaired, None, tmp_path / "r", {"removed": [0, 1]})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    assert torch.allclose(logits(reloaded, ids), logits(repaired, ids), atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_reload_and_generate_with_kv_cache(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model, removed = FAMILIES[family](), [1, 2, 4]
    repaired, info = repair_linear(model, removed, random_calibration())
    save_pruned(repaired, None, tmp_path / "r", {"removed": removed, "repair": info})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "r").eval()
    assert json.loads((tmp_path / "r" / "removal.json").read_text())["repair"]["runs"][0]["fold_into"]
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(logits(reloaded, ids), logits(repaired, ids), atol=1e-5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = reloaded.generate(ids, use_cache=True, **kw)
        uncached = reloaded.generate(ids, use_cache=False, **kw)
    assert cached.shape[1] == 14 and torch.equal(cached, uncached)


def _tiny(config_cls, model_cls, **kw):
    torch.manual_seed(0)
    config = config_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, **kw)
    return model_cls(config).eval()


def test_refuses_post_norm_and_moe_in_one_line():
    from transformers import Gemma2Config, Gemma2ForCausalLM, MixtralConfig, MixtralForCausalLM

    cases = [(_tiny(Gemma2Config, Gemma2ForCausalLM), "post-norm"),
             (_tiny(MixtralConfig, MixtralForCausalLM, num_local_experts=2, num_experts_per_tok=1), "experts")]
    for model, word in cases:
        with pytest.raises(CBOPruneError, match=word) as exc:
            repair_linear(model, [1, 2], random_calibration())
        assert "\n" not in str(exc.value)


def test_bad_input_is_refused_before_work():
    model = tiny_llama()
    for kwargs, word in (({"objective": "l1"}, "objective"), ({"ridge": -1.0}, "ridge")):
        with pytest.raises(CBOPruneError, match=word):
            repair_linear(model, [2], random_calibration(), **kwargs)
    with pytest.raises(CBOPruneError, match="0..5"):
        repair_linear(model, [9], random_calibration())


def test_cli_source_resolution(tmp_path):
    from cboprune.repair.cli import RepairOptions, resolve_source
    from cboprune.core.options import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, RepairOptions)
    args = parser.parse_args(["default", "--blocks", "3,4", "--output-dir", str(tmp_path / "o")])
    assert resolve_source(args.source, args.blocks)[:2] == ("default", [3, 4])
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "removal.json").write_text(json.dumps({"source_model": "default", "removed": [5, 6]}))
    assert resolve_source(str(pruned), None)[:2] == ("default", [5, 6])
    with pytest.raises(CBOPruneError, match="differs"):
        resolve_source(str(pruned), [1])
    with pytest.raises(CBOPruneError, match="--blocks"):
        resolve_source(str(tmp_path), None)
    # a hostile or damaged removal.json, a missing path: one line each, duplicates left to validate_removal
    for text, match in (("{not json", "cannot be read as JSON"), ("[1, 2]", "not a JSON object"),
                        ('{"source_model": "default", "removed": "5,6"}', "list of block indices"),
                        ('{"source_model": ["x"], "removed": [5]}', "must be a string")):
        (pruned / "removal.json").write_text(text)
        with pytest.raises(CBOPruneError, match=match):
            resolve_source(str(pruned), None)
    with pytest.raises(CBOPruneError, match="does not exist"):
        resolve_source(str(tmp_path / "nowhere"), [1])
    assert resolve_source("default", [3, 3])[1] == [3, 3]


def test_one_pass_serves_several_configurations():
    """Moments of the runs of several configurations (sharing a fold block) and both objectives,
    collected in one pass, equal those of each configuration alone."""
    from cboprune.repair.linear import Run, plan_runs

    model, calib = tiny_llama(), random_calibration()
    runs = [Run(2, 3), Run(2, 4), Run(0, 0), Run(3, 4)]  # two runs end at the last block the pass needs
    both = collect_moments(model, plan_runs(model, runs), calib, objectives=("lstsq", "cosine"))
    for removed, obj in (([2, 3], "lstsq"), ([2, 3, 4], "cosine"), ([0], "cosine"), ([3, 4], "lstsq")):
        plan = plan_repair(model, removed)
        alone = collect_moments(model, plan, calib, objectives=(obj,))[(plan.runs[0], obj)]
        shared = both[(plan.runs[0], obj)]
        assert torch.allclose(alone.A, shared.A) and torch.allclose(alone.B, shared.B)
        assert alone.n_tokens == shared.n_tokens == int(calib.attention_mask.sum())


def test_repair_command_end_to_end(tmp_path, shared_data, capsys):
    """`cboprune repair PRUNED`: refits on the source model named in removal.json, saves a checkpoint
    whose removal.json records the repair, and that reloads with from_pretrained."""
    from transformers import AutoModelForCausalLM

    from cboprune.repair.cli import RepairOptions, run_repair_command
    from cboprune.core.options import add_arguments
    from conftest import save_tiny_checkpoint

    original = save_tiny_checkpoint(tmp_path / "orig")
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "removal.json").write_text(json.dumps({"source_model": str(original), "removed": [2, 3],
                                                     "method": "manual"}))
    parser = argparse.ArgumentParser()
    add_arguments(parser, RepairOptions)
    args = parser.parse_args([str(pruned), "--data", str(shared_data / "calib" / "alpaca_en_demo.json"),
                              "--n-samples", "4", "--heldout", "2", "--seq-len", "32", "--device", "cpu",
                              "--objective", "cosine", "--output-dir", str(tmp_path / "out")])
    assert run_repair_command(args) == 0
    assert "held-out NLL (2 samples)" in capsys.readouterr().out
    prov = json.loads((tmp_path / "out" / "removal.json").read_text())
    assert prov["removed"] == [2, 3] and prov["kept"] == [0, 1, 4, 5] and prov["method"] == "manual"
    assert prov["repair"]["objective"] == "cosine" and prov["repair"]["runs"][0]["removed"] == [2, 3]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 4
    with pytest.raises(CBOPruneError, match="already repaired"):
        run_repair_command(parser.parse_args([str(tmp_path / "out"), "--output-dir", str(tmp_path / "o2")]))
