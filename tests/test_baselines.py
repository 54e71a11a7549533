"""Each peer criterion's defining property on tiny random Llama models, and merged-block surgery."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cboprune.core import methods
from cboprune.baselines._common import top_m_ranking
from cboprune.models.block_stats import collect_block_stats
from cboprune.baselines._loss_based import perplexity_criterion, sleb, taylor_plus, taylor_scores
from cboprune.baselines._similarity import (angular_distance, block_influence, block_influence_iterative,
                                            block_influence_scores, norm_ratio)
from cboprune.baselines._swm import MergeSimilarity, sliding_window_merging, sweep
from cboprune.engine.experiment import SelectionContext, select
from cboprune.models.masked import calibration_nll
from cboprune.data.calibration import CalibrationSet
from cboprune.core.errors import CBOPruneError
from cboprune.models.merging import apply_candidate, merge_blocks, save_candidate
from cboprune.models.surgery import remove_blocks
from cboprune.core.ranking import Candidate

from conftest import tiny_llama


def _calibration(vocab: int = 128, n: int = 6, s: int = 20, seed: int = 1) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, s), generator=g)
    mask = torch.ones_like(ids)
    mask[n // 2:, s - 6:] = 0  # right padding on half the samples
    return CalibrationSet(ids, mask, source="test")


@pytest.fixture(scope="module")
def model():
    return tiny_llama(n_layers=6)


@pytest.fixture(scope="module")
def calib():
    return _calibration()


def _hidden_states(model, calib):
    with torch.no_grad():
        return model(input_ids=calib.input_ids, attention_mask=calib.attention_mask,
                     output_hidden_states=True).hidden_states


def _loss_after_surgery(model, calib, removed) -> float:
    pruned = remove_blocks(copy.deepcopy(model), removed) if removed else model
    return calibration_nll(pruned, calib, batch_size=4)


# ----------------------------------------------------------------------------- one-shot criteria

def test_block_influence_is_one_minus_token_cosine(model, calib):
    hs = _hidden_states(model, calib)
    valid = calib.attention_mask.bool()
    stats = collect_block_stats(model, calib, batch_size=4)
    bi = block_influence_scores(stats)
    for i in range(len(hs) - 2):  # hidden_states[-1] has the final norm applied: compare the others
        cos = torch.nn.functional.cosine_similarity(hs[i], hs[i + 1], dim=-1)[valid]
        assert bi[i] == pytest.approx(1 - float(cos.mean()), abs=1e-5)
    ranking = block_influence(model, calib, 2, top=4, stats=stats)
    assert ranking.best.removed == tuple(sorted(np.argsort(bi)[:2]))
    assert [c.score for c in ranking] == sorted(c.score for c in ranking)
    assert ranking.method == "bi" and ranking.info["block_scores"] == pytest.approx(bi.tolist())


def test_top_m_ranking_is_the_exact_k_best_subsets():
    scores = np.array([0.3, -0.2, 0.9, 0.1, 0.5, 0.05, 0.7])
    ranking = top_m_ranking("x", scores, 3, top=6, keep=[5])
    brute = sorted((scores[list(c)].sum(), c) for c in itertools.combinations(range(7), 3) if 5 not in c)
    assert [c.removed for c in ranking] == [c for _, c in brute[:6]]
    assert [c.score for c in ranking] == pytest.approx([s for s, _ in brute[:6]])


def test_norm_ratio_is_output_over_input_norm(model, calib):
    hs = _hidden_states(model, calib)
    valid = calib.attention_mask.bool()
    ranking = norm_ratio(model, calib, 2, top=3)
    r = np.array(ranking.info["block_scores"])
    for i in range(len(hs) - 2):
        expect = (hs[i + 1].norm(dim=-1) / hs[i].norm(dim=-1))[valid].mean()
        assert r[i] == pytest.approx(float(expect), rel=1e-5)
    assert ranking.best.removed == tuple(sorted(np.argsort(r)[:2]))  # lowest ratio: changes its input least


def test_angular_distance_picks_the_closest_contiguous_window(model, calib):
    hs = _hidden_states(model, calib)
    last = calib.attention_mask.sum(dim=1) - 1
    rows = torch.arange(calib.n_samples)
    n_rm = 2
    ranking = angular_distance(model, calib, n_rm, top=5)
    d = ranking.info["window_distances"]
    assert len(d) == 6 - n_rm + 1
    for start in range(len(hs) - 1 - n_rm):  # windows whose output is not the final-normed state
        a, b = hs[start][rows, last], hs[start + n_rm][rows, last]
        expect = torch.arccos(torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)) / math.pi
        assert d[start] == pytest.approx(float(expect.mean()), abs=1e-5)
    best = int(np.argmin(d))
    assert ranking.best.removed == (best, best + 1)
    assert all(c.removed == tuple(range(c.removed[0], c.removed[0] + n_rm)) for c in ranking)
    assert [c.score for c in ranking] == sorted(d)[:5]


def test_ppl_criterion_scores_are_perplexity_without_each_block(model, calib):
    ranking = perplexity_criterion(model, calib, 2, top=3, batch_size=4)
    ppl = ranking.info["block_scores"]
    for j in (0, 3, 5):
        assert ppl[j] == pytest.approx(math.exp(_loss_after_surgery(model, calib, [j])), rel=1e-4)
    assert ranking.best.removed == tuple(sorted(np.argsort(ppl)[:2]))


def test_taylor_scores_are_weight_times_gradient_saliency(calib):
    m = tiny_llama(n_layers=8)
    one_batch = CalibrationSet(calib.input_ids[:3], calib.attention_mask[:3], source="t")
    scores = taylor_scores(m, one_batch, batch_size=8)
    # Direct: loss = mean token NLL of the batch, saliency sum |w * dL/dw| over the block's weights.
    m.zero_grad()
    logits = m(input_ids=one_batch.input_ids, attention_mask=one_batch.attention_mask).logits
    tgt = one_batch.input_ids[:, 1:]
    valid = one_batch.attention_mask[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, reduction="none")[valid].mean()
    nll.backward()
    for b in (0, 5):
        layer = m.model.layers[b]
        expect = sum(float((p.detach() * p.grad).abs().sum()) for n, p in layer.named_parameters() if n.endswith("weight"))
        assert scores[b] == pytest.approx(expect, rel=1e-4)
    assert all(p.requires_grad for p in m.parameters())  # flags restored
    ranking = taylor_plus(m, one_batch, 2, top=3, scores=scores)
    assert not set(ranking.best.removed) & {0, 1, 2, 3, 6, 7}  # Taylor+: first four and last two kept
    allowed = [4, 5]
    assert ranking.best.removed == tuple(allowed)
    plain = taylor_plus(m, one_batch, 2, scores=scores, plus=False)
    assert plain.best.removed == tuple(sorted(np.argsort(scores)[:2]))


# ----------------------------------------------------------------------------- iterative criteria

def _amplifier_model(c_norm: float = 2.0, s1: float = 0.5, s_late: float = 1.4):
    """6 blocks; block 0 and block 2 add the same constant vector c (an MLP bias). Block 2 thus
    only rescales a residual that already points along c: its BI is the lowest. Removing it halves
    the residual norm seen by blocks 3-5, whose BI then rises above block 1's (scaled down by s1)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, mlp_bias=True)
    m = LlamaForCausalLM(cfg).eval()
    c = torch.zeros(32)
    c[0] = c_norm
    layers = m.model.layers
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.mlp.down_proj.bias.zero_()
            scale = 8.0 * (s1 if i == 1 else s_late if i >= 3 else 1.0)
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
        layers[0].mlp.down_proj.bias.copy_(c)
        layers[2].self_attn.o_proj.weight.zero_()
        layers[2].mlp.down_proj.weight.zero_()
        layers[2].mlp.down_proj.bias.copy_(c)
    return m


def test_iterative_bi_recomputes_scores_and_differs_from_one_shot():
    m = _amplifier_model()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    cal = CalibrationSet(ids, torch.ones_like(ids), source="t")
    one_shot = block_influence(m, cal, 2)
    iterative = block_influence_iterative(m, cal, 2)
    order = iterative.info["order"]
    assert order[0] == 2 and 2 in one_shot.best.removed  # the amplifier goes first in both
    assert 1 not in one_shot.best.removed and order[1] == 1  # re-scoring changes the second pick
    assert one_shot.best.removed != iterative.best.removed
    # Each step's scores are Block Influence of the model with the earlier picks removed.
    for step, row in enumerate(iterative.info["step_block_scores"]):
        bi = block_influence_scores(collect_block_stats(m, cal, removed=order[:step]))
        for i, v in enumerate(row):
            if i not in order[:step]:
                assert v == pytest.approx(bi[i], rel=1e-5, abs=1e-9)
    # Paper notation: indices of the current, shrunk model (block 1 is still index 1 after removing 2).
    assert iterative.info["order_shrunk"] == [2, 1]


def test_iterative_bi_shrunk_indices(model, calib):
    r = block_influence_iterative(model, calib, 4, batch_size=4)
    order, shrunk = r.info["order"], r.info["order_shrunk"]
    for k, (orig, cur) in enumerate(zip(order, shrunk)):
        assert cur == orig - sum(1 for o in order[:k] if o < orig)
    assert r.best.removed == tuple(sorted(order)) and len(set(order)) == 4


def test_sleb_first_pick_hurts_calibration_loss_least_and_rescores(model, calib):
    r = sleb(model, calib, 2, batch_size=4)
    losses = {j: _loss_after_surgery(model, calib, [j]) for j in range(6)}
    first = r.info["order"][0]
    assert first == min(losses, key=losses.get)
    second_losses = {j: _loss_after_surgery(model, calib, [first, j]) for j in range(6) if j != first}
    assert r.info["order"][1] == min(second_losses, key=second_losses.get)
    assert r.best.score == pytest.approx(math.exp(second_losses[r.info["order"][1]]), rel=1e-4)


# ----------------------------------------------------------------------------- sliding-window merging

def test_swm_merged_checkpoint_reloads_and_follows_the_weight_rule(tmp_path, calib):
    m = tiny_llama(n_layers=8)
    ranking = sliding_window_merging(m, calib, 3, batch_size=4)
    cand = ranking.best
    assert len(cand.removed) == 3 and cand.merged
    assert all(7 not in g for g in cand.merged)  # the last block is never merged
    assert set(cand.removed) == {i for g in cand.merged for i in g[1:]}
    out = save_candidate(m, None, cand, tmp_path / "swm", {"method": "swm"})
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 5
    kept = [i for i in range(8) if i not in cand.removed]
    orig = m.model.layers
    for new_i, old_i in enumerate(kept):
        layer = reloaded.model.layers[new_i]
        group = next((g for g in cand.merged if g[0] == old_i), None)
        for name, p in layer.named_parameters():
            if group is not None and name.startswith(("self_attn.", "mlp.")):
                anchor = orig[old_i].get_parameter(name)
                expect = anchor + sum(orig[k].get_parameter(name) - anchor for k in group[1:])
            else:  # untouched blocks, and the anchor's norms
                expect = orig[old_i].get_parameter(name)
            torch.testing.assert_close(p, expect, rtol=1e-6, atol=1e-6)
    # The in-memory merged model and the reloaded checkpoint agree.
    merged = apply_candidate(copy.deepcopy(m), cand)
    ids = calib.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, merged(input_ids=ids).logits)


def test_swm_similarity_uses_gates_like_real_merging(calib):
    m = tiny_llama(n_layers=6)
    sim = MergeSimilarity(m, calib, batch_size=4)
    try:
        value = sim(((2, 4),))
    finally:
        sim.close()
    merged = merge_blocks(copy.deepcopy(m), [(2, 3, 4)])
    with torch.no_grad():
        ref = m.model(input_ids=calib.input_ids, attention_mask=calib.attention_mask).last_hidden_state
        out = merged.model(input_ids=calib.input_ids, attention_mask=calib.attention_mask).last_hidden_state
    mask = calib.attention_mask.unsqueeze(-1)
    cos = torch.nn.functional.cosine_similarity((ref * mask).flatten(1), (out * mask).flatten(1), dim=1)
    assert value == pytest.approx(float(cos.mean()), abs=1e-5)
    for name, p in m.named_parameters():  # weights restored after the evaluation
        torch.testing.assert_close(p, tiny_llama(n_layers=6).get_parameter(name))


def test_swm_sweep_slides_top_down():
    class Fake:  # similarity falls with the number of folded blocks
        def __call__(self, groups):
            return 1.0 - 0.1 * sum(h - l for l, h in groups)

    groups, trace = sweep(Fake(), 10, threshold=-1.0, max_remove=3)
    assert groups == [(5, 8)] and trace[0]["window"] == [7, 8]  # starts below the last block
    groups, _ = sweep(Fake(), 10, threshold=0.75)  # windows close when similarity drops to 0.75
    assert groups == [(6, 8)] and sum(h - l for l, h in groups) == 2


def test_merge_rules_and_candidate_validation(model):
    a = torch.tensor([1.0, 2.0])
    b = torch.tensor([3.0, 1.0])
    c = torch.tensor([0.0, 5.0])
    from cboprune.models.merging import merged_values

    torch.testing.assert_close(merged_values([a, b, c], "difference"), a + (b - a) + (c - a))
    torch.testing.assert_close(merged_values([a, b, c], "reference-code"), c)
    with pytest.raises(CBOPruneError, match="consecutive"):
        merge_blocks(copy.deepcopy(model), [(1, 3)])
    with pytest.raises(CBOPruneError, match="non-anchor"):
        apply_candidate(copy.deepcopy(model), Candidate(removed=(1,), score=0.0, rank=0, merged=((1, 2),)))
    # Merging and plain removal together: 6 -> 3 blocks, block 5 removed after the merge shifts indices.
    out = apply_candidate(copy.deepcopy(model), Candidate(removed=(2, 3, 5), score=0.0, rank=0, merged=((1, 2, 3),)))
    assert out.config.num_hidden_layers == 3
    torch.testing.assert_close(out.model.layers[2].mlp.up_proj.weight, model.model.layers[4].mlp.up_proj.weight)


# ----------------------------------------------------------------------------- registry

def test_every_criterion_returns_a_ranking_of_m_blocks(model, calib):
    for name in methods.names(methods.PEER):
        context = SelectionContext(model, calib, batch_size=4, top=2)
        by_m = select(name, context, [2, 3])
        for m, r in by_m.items():
            assert r.method == name and r.n_blocks == 6 and r.n_remove == m
            assert all(len(c.removed) == m for c in r) and r.info.get("reference" if name != "last-m" else "criterion")


def test_last_m_removes_the_blocks_before_the_final_one(model, calib):
    by_m = select("last-m", SelectionContext(model, calib, keep=(3,)), [2, 4])
    assert by_m[2].best.removed == (2, 4) and by_m[4].best.removed == (0, 1, 2, 4)
    with pytest.raises(CBOPruneError, match="choose 1 <= M <= 4"):
        select("last-m", SelectionContext(model, calib), [5])


def test_registry_lists_methods_without_torch_and_suggests_names():
    import subprocess
    import sys

    code = ("import sys; from cboprune.core import methods; names = methods.names(); "
            "assert 'last-m' in names and 'measured' in names, names; print(int('torch' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
    with pytest.raises(CBOPruneError, match="did you mean 'sleb'"):
        methods.parse_names("bi,sleeb", methods.PEER)
    assert methods.get("sleb").cost(30, 8) == 8 * 30 - 28 and methods.get("bi-iter").cost(30, 8) == 8
    assert "`last-m`" in methods.method_table()


def test_unknown_criterion_and_bad_m_are_user_errors(model, calib):
    with pytest.raises(CBOPruneError, match="did you mean 'sleb'"):
        select("sleeb", SelectionContext(model, calib), [2])
    with pytest.raises(CBOPruneError, match="choose 1 <= M"):
        select("bi", SelectionContext(model, calib), [6])
