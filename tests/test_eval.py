"""Evaluation: scorer, protocols, task formats, errors and the lm-eval bridge, on tiny models."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from cboprune.core.errors import CBOPruneError
from cboprune.evaluation import evaluate, markdown_table, resolve_tasks, write_results
from cboprune.evaluation import metrics as M
from cboprune.evaluation.data import read_hellaswag, read_mc_jsonl, resolve_eval_dir, wikitext_detokenize
from cboprune.evaluation.runner import _fewshot_prefixes
from cboprune.evaluation.scorer import Scorer, rolling_windows
from cboprune.evaluation.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("CBOPRUNE_DATA_DIR", REPO.parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "eval").is_dir() and not DATA.is_dir(),
                                reason=f"shared data not found at {DATA} (set CBOPRUNE_DATA_DIR)")


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (from the cached checkpoint; created once if missing)."""
    from transformers import AutoTokenizer

    from cboprune.models.loading import default_gguf_path, gguf_to_checkpoint

    tok = AutoTokenizer.from_pretrained(gguf_to_checkpoint(default_gguf_path()))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_lm(tokenizer):
    """A 2-layer random Llama (hidden 64) over the real tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper distributions than the default init, so answers differ
        model.lm_head.weight.mul_(20.0)
    return model


def _direct_logprob(model, ids: list[int], n_cont: int) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[k - 1, ids[k]].item() for k in range(len(ids) - n_cont, len(ids)))


GROUPS = [
    [("Question: What is the capital of France?\nAnswer:", " Paris"),
     ("Question: What is the capital of France?\nAnswer:", " London is big"),
     ("Question: What is the capital of France?\nAnswer:", " a city in Germany, probably")],
    [("The cat sat on the mat and", " slept."), ("The dog sat on the mat and", " slept.")],
    [("Short", " one"), ("Short", " two words")],
]


def test_scorer_matches_direct_forward_and_packing(tiny_lm, tokenizer):
    packed = Scorer(tiny_lm, tokenizer, share_prefix=True, progress=False).loglikelihood_groups(GROUPS)
    single = Scorer(tiny_lm, tokenizer, share_prefix=False, progress=False, batch_size=2).loglikelihood_groups(GROUPS)
    sc = Scorer(tiny_lm, tokenizer, progress=False)
    for group, pg, sg in zip(GROUPS, packed, single):
        for (ctx, cont), p, s in zip(group, pg, sg):
            req = sc.tokenize_pair(ctx, cont)
            ref = _direct_logprob(tiny_lm, req.whole, len(req.continuation_ids))
            assert p.logprob == pytest.approx(ref, abs=1e-3)
            assert s.logprob == pytest.approx(ref, abs=1e-3)
            assert p.n_tokens == len(req.continuation_ids)
    assert sc.sharing_enabled()  # the probe accepts Llama's custom 4D masks


def test_tokenize_pair_moves_trailing_space(tiny_lm, tokenizer):
    sc = Scorer(tiny_lm, tokenizer, progress=False)
    a = sc.tokenize_pair("The answer is ", "yes")
    b = sc.tokenize_pair("The answer is", " yes")
    assert (a.context_ids, a.continuation_ids) == (b.context_ids, b.continuation_ids)
    empty = sc.tokenize_pair("", "hello world")
    assert empty.context_ids == [sc.prefix_token_id]


@pytest.mark.parametrize("n,length,stride", [(1, 8, 8), (7, 8, 8), (8, 8, 8), (23, 8, 8), (23, 8, 3), (40, 16, 5)])
def test_rolling_windows_cover_every_token_once(n, length, stride):
    tokens = list(range(100, 100 + n))
    seen = []
    for inp, targets in rolling_windows(tokens, 1, length, stride):
        assert len(inp) <= length
        x = [1] + tokens
        for pos, tok in targets:
            k = tokens.index(tok)
            assert inp[pos] == x[k]  # the input at `pos` is the token right before the target
            assert pos >= min(k, length - stride) or k < length  # context of at least L - stride
            seen.append(tok)
    assert seen == tokens


def test_rolling_windows_equal_lm_eval_protocol():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n, length in [(5, 8), (8, 8), (29, 8), (64, 16)]:
        tokens = list(range(10, 10 + n))
        ours = [(inp, [t for _, t in tg]) for inp, tg in rolling_windows(tokens, 0, length, length)]
        theirs = []
        for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tokens, 0, length, 1)):
            theirs.append(((ctx + cont)[:-1], cont))
        assert ours == theirs


def test_rolling_perplexity_matches_full_forward(tiny_lm, tokenizer):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    sc = Scorer(tiny_lm, tokenizer, progress=False, max_length=256)
    (res,) = sc.rolling_loglikelihood([text])
    ids = [sc.prefix_token_id] + sc.encode(text)
    assert res.n_tokens == len(ids) - 1
    assert res.logprob == pytest.approx(_direct_logprob(tiny_lm, ids, len(ids) - 1), abs=1e-3)
    # a shorter window with overlap scores the same tokens, with less context
    (short,) = Scorer(tiny_lm, tokenizer, progress=False, max_length=16).rolling_loglikelihood([text], stride=4)
    assert short.n_tokens == res.n_tokens and short.logprob != pytest.approx(res.logprob, abs=1e-6)


@needs_data
def test_wikitext_detokenizer_equals_lm_eval():
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    pages = TASKS["wikitext"].load(resolve_eval_dir(DATA))
    assert len(pages) > 50 and pages[0].startswith(" = ")
    for page in pages[:5]:
        assert wikitext_detokenize(page) == wikitext_detokenizer({"page": page})


@pytest.mark.slow
@needs_data
def test_builtin_equals_lm_eval_on_tiny_model(tiny_lm, tokenizer):
    tasks = ["arc_easy", "hellaswag", "winogrande", "lambada_openai", "wikitext"]
    kw = {"limit": 3, "data_dir": DATA, "log_samples": True, "max_length": 128, "batch_size": 8}
    ours = evaluate(tiny_lm, tokenizer, tasks, progress=False, **kw)
    theirs = evaluate(tiny_lm, tokenizer, tasks, backend="lm-eval", **kw)
    for task in ("arc_easy", "hellaswag", "winogrande"):
        for a, b in zip(ours["samples"][task], theirs["samples"][task]):
            assert a["lls"] == pytest.approx(b["lls"], abs=2e-3)
            assert a["pred"] == b["pred"] and a["pred_norm"] == b["pred_norm"]
        assert ours["results"][task]["metrics"]["acc"] == theirs["results"][task]["metrics"]["acc"]
    for a, b in zip(ours["samples"]["lambada_openai"], theirs["samples"]["lambada_openai"]):
        assert a["ll"] == pytest.approx(b["ll"], abs=2e-3) and a["is_greedy"] == b["is_greedy"]
    wo, wt = (r["results"]["wikitext"]["metrics"]["word_perplexity"] for r in (ours, theirs))
    assert wo == pytest.approx(wt, rel=1e-4)


@needs_data
def test_generation_tasks_run(tiny_lm, tokenizer):
    res = evaluate(tiny_lm, tokenizer, ["gsm8k", "bbh_boolean_expressions"], limit=2, num_fewshot=0,
                   data_dir=DATA, progress=False, log_samples=True)
    for task in ("gsm8k", "bbh_boolean_expressions"):
        m = res["results"][task]["metrics"]
        assert set(m) == {"exact_match_strict", "exact_match_flexible"}
        assert all(0.0 <= v <= 1.0 for v in m.values())
        assert all("Question:" not in s["output"] for s in res["samples"][task])
    assert res["groups"]["bbh"]["config"]["tasks"] == 1


@needs_data
def test_mmlu_fewshot_prompt_uses_dev_split_first_n():
    spec = TASKS["mmlu_anatomy"]
    eval_dir = resolve_eval_dir(DATA)
    docs, dev = spec.load(eval_dir), spec.load_fewshot(eval_dir)
    (prefix,) = _fewshot_prefixes(spec, docs, docs[:1], 2, eval_dir)
    assert prefix.startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    expected = spec.description + "".join(
        spec.text(d) + " " + "ABCD"[d["answer"]] + "\n\n" for d in dev[:2])
    assert prefix == expected


def test_metrics_and_answer_extraction():
    mean, err = M.mean_and_stderr([1, 0, 1, 1])
    assert mean == 0.75 and err == pytest.approx(math.sqrt(0.25 / 4))
    assert M.mc_predictions([-10.0, -12.0], ["a", "much longer answer"]) == (0, 1)
    assert M.gsm8k_extract("so 3 + 4 = 7.\n#### 7") == ("7", "7")
    assert M.gsm8k_scores("The total is $1,250.", "blah\n#### 1250") == {
        "exact_match_strict": 0.0, "exact_match_flexible": 1.0}
    assert M.bbh_scores(" The answer is (B).", "(B)")["exact_match_flexible"] == 1.0
    assert M.bbh_scores("True", "True")["exact_match_strict"] == 1.0
    assert M.bbh_scores(" false, because", "False") == {"exact_match_strict": 0.0, "exact_match_flexible": 1.0}


def test_resolve_tasks_groups_aliases_and_unknown_names():
    assert len(resolve_tasks("mmlu")) == 57 and len(resolve_tasks(["bbh"])) == 27
    assert [t.name for t in resolve_tasks("lambada, arc_e,arc_easy")] == ["lambada_openai", "arc_easy"]
    with pytest.raises(CBOPruneError, match="did you mean arc_easy") as exc:
        resolve_tasks("arc_esy")
    assert "\n" not in str(exc.value)
    with pytest.raises(CBOPruneError, match="unknown task 'nonsense'"):
        resolve_tasks("nonsense")


def test_missing_and_malformed_data_give_one_line_errors(tmp_path, tiny_lm, tokenizer):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "arc_easy.jsonl").write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n')
    with pytest.raises(CBOPruneError, match="piqa.jsonl") as exc:
        evaluate(tiny_lm, tokenizer, ["piqa"], data_dir=tmp_path, progress=False)
    assert "--data-dir" in str(exc.value) and "\n" not in str(exc.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 0}\n{"query": "Q", "choices": ["a"]}\n')
    with pytest.raises(CBOPruneError, match=r"bad.jsonl \(line 2\): missing key 'gold'"):
        read_mc_jsonl(bad, "arc_easy")
    bad.write_text('{"query": "Q", "choices": ["a", "b"], "gold": 5}\n')
    with pytest.raises(CBOPruneError, match="gold 5 is not an index"):
        read_mc_jsonl(bad, "arc_easy")
    bad.write_text("{not json\n")
    with pytest.raises(CBOPruneError, match="invalid JSON"):
        read_mc_jsonl(bad, "arc_easy")
    hs = tmp_path / "hs.txt"
    hs.write_text("ctx\n1\na\nb\nc\n")
    with pytest.raises(CBOPruneError, match="not a multiple of 6"):
        read_hellaswag(hs, "hellaswag")
    with pytest.raises(CBOPruneError, match="no benchmark data folder"):
        resolve_eval_dir(tmp_path / "nowhere")


def test_text_file_perplexity_and_results_files(tmp_path, tiny_lm, tokenizer):
    text = tmp_path / "notes.txt"
    text.write_text("Pruning removes whole blocks.\nThe model stays a normal checkpoint.\n")
    res = evaluate(tiny_lm, tokenizer, [f"file:{text}"], progress=False, max_length=64, stride=32)
    m = res["results"][f"file:{text}"]["metrics"]
    assert m["token_perplexity"] > 1 and m["word_perplexity"] > m["token_perplexity"]
    json_path, md_path = write_results(res, tmp_path / "out" / "eval.json")
    loaded = json.loads(json_path.read_text())
    assert loaded["cboprune"]["results"][f"file:{text}"]["config"]["stride"] == 32
    assert loaded["results"][f"file:{text}"]["token_perplexity,none"] == pytest.approx(m["token_perplexity"])
    assert "token_perplexity" in md_path.read_text() and "| task |" in markdown_table(res)


@pytest.mark.slow
def test_cli_arguments_and_errors(capsys):
    import argparse

    from cboprune.evaluation.cli import EvalOptions, run_eval_command
    from cboprune.core.options import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, EvalOptions)
    assert run_eval_command(parser.parse_args(["--list-tasks"])) == 0
    assert "arc_easy" in capsys.readouterr().out
    with pytest.raises(CBOPruneError, match="did you mean hellaswag"):
        run_eval_command(parser.parse_args(["default", "--tasks", "helaswag"]))
    with pytest.raises(CBOPruneError, match="no task given"):
        run_eval_command(parser.parse_args(["default"]))


MY_TASK = """task: my_task
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: gold
doc_to_choice: choices
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _my_task_dir(tmp_path: Path) -> Path:
    items = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a * b + 1), "none"], "gold": 0}
             for a, b in [(1, 2), (3, 4), (5, 1), (2, 2), (7, 3), (6, 6)]]
    data = tmp_path / "my_items.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in items))
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "my_task.yaml").write_text(MY_TASK.format(data=data))
    return tasks


def test_include_path_task_reproduces_lm_eval_hf(tmp_path, tiny_lm, tokenizer):
    """A user's YAML task on a local jsonl: cboprune's numbers are `lm_eval --model hf`'s."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = _my_task_dir(tmp_path)
    ckpt = tmp_path / "ckpt"
    tiny_lm.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    ours = evaluate(tiny_lm, tokenizer, "my_task", include_path=tasks, batch_size=4, log_samples=True)
    ref = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(ckpt)}, tasks=["my_task"], batch_size=4, device="cpu",
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    theirs = ref["results"]["my_task"]
    assert ours["results"]["my_task"]["n"] == 6
    assert ours["lm_eval"]["results"]["my_task"]["acc,none"] == theirs["acc,none"]
    assert ours["results"]["my_task"]["metrics"]["acc_norm"] == theirs["acc_norm,none"]
    ours_lls = [s["lls"] for s in ours["samples"]["my_task"]]
    ref_lls = [[float(r[0]) for r in s["filtered_resps"]] for s in sorted(ref["samples"]["my_task"],
                                                                          key=lambda s: s["doc_id"])]
    assert len(ours_lls) == 6 and all(a == pytest.approx(b, abs=1e-5) for a, b in zip(ours_lls, ref_lls))
    json_path, _ = write_results(ours, tmp_path / "res")
    doc = json.loads(json_path.read_text())
    assert doc["results"]["my_task"]["acc,none"] == theirs["acc,none"] and "my_task" in doc["configs"]
    assert doc["cboprune"]["results"]["my_task"]["config"]["backend"] == "lm-eval"


@pytest.mark.slow
def test_offline_hub_task_and_bad_task_inputs_are_one_line(tmp_path, monkeypatch):
    from cboprune.evaluation import plan_tasks

    tasks = _my_task_dir(tmp_path)
    (tasks / "hub_task.yaml").write_text(MY_TASK.replace("task: my_task", "task: hub_task").replace(
        "dataset_path: json", "dataset_path: someorg/not_cached_dataset").format(data="x"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CBOPruneError, match="hub_task need their dataset from the Hugging Face hub, which is "
                                            "unreachable") as exc:
        plan_tasks("hub_task", include_path=tasks)
    assert "\n" not in str(exc.value) and "--include-path" in str(exc.value)
    plan = plan_tasks("my_task,arc_easy,file:" + str(tasks / "my_task.yaml"), include_path=tasks,
                      data_dir=DATA if DATA.is_dir() else None) if DATA.is_dir() else None
    if plan is not None:
        assert plan.lm_eval == ["my_task"] and [s.name for s in plan.builtin][0] == "arc_easy"
        assert plan.kinds["my_task"] == "multiple_choice" and sorted(plan.other_tasks()) == ["arc_easy", "my_task"]
        sub = plan.subset(plan.perplexity_tasks())
        assert sub.lm_eval == [] and [s.name for s in sub.builtin] == [f"file:{tasks / 'my_task.yaml'}"]
    with pytest.raises(CBOPruneError, match="is not a directory"):
        plan_tasks("my_task", include_path=tmp_path / "nowhere")
    with pytest.raises(CBOPruneError, match="unknown task 'my_tsk': did you mean my_task"):
        plan_tasks("my_tsk", include_path=tasks)
    with pytest.raises(CBOPruneError, match="needs lm-eval"):
        plan_tasks("arc_easy", backend="builtin", apply_chat_template=True)
    monkeypatch.setenv("CBOPRUNE_DATA_DIR", str(tmp_path / "no_data"))
    with pytest.raises(CBOPruneError, match="--data-dir.*CBOPRUNE_DATA_DIR"):
        plan_tasks("arc_easy")


@pytest.mark.parametrize("content, match", [
    (b"\x00\x01\x02binary\x00", "looks like a binary file"),
    ("caf\u00e9 latin-1".encode("latin-1"), "is not UTF-8 text"),
    (None, "is a directory"),
])
def test_file_task_binary_non_utf8_or_directory_is_one_line(tmp_path, content, match):
    from cboprune.evaluation import plan_tasks

    path = tmp_path / "corpus.txt"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    for name in (str(path), str(path.with_suffix(".jsonl"))):
        if content is not None and name.endswith(".jsonl"):
            Path(name).write_bytes(content)
        with pytest.raises(CBOPruneError, match=match) as exc:
            plan_tasks(f"file:{name}")
        assert "\n" not in str(exc.value)
        if content is None:
            break


def _eval_args(*extra: str):
    import argparse

    from cboprune.evaluation.cli import EvalOptions
    from cboprune.core.options import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, EvalOptions)
    # A model path that does not exist: an error about it would mean the check came too late.
    return parser.parse_args(["/nonexistent/model", "--tasks", "file:/etc/hostname", *extra])


@pytest.mark.parametrize("extra, match", [
    (["--max-length", "0"], "--max-length must be at least 2"),
    (["--batch-size", "0"], "--batch-size must be a positive"),
    (["--batch-size", "-3"], "--batch-size must be a positive"),
    (["--limit", "0"], "--limit must be a positive"),
    (["--output", "."], "is a directory"),
    (["--output", "{tmp}"], "is a directory"),
    (["--output", "{tmp}/afile"], "is an existing file"),
    (["--output", "{tmp}/afile/res"], "is a file, not a folder"),
    (["--output", "{tmp}/old.json"], "exists: choose another --output or pass --overwrite"),
    (["--output", "{tmp}/adir.json"], "is a directory"),
    (["--output", "{tmp}/ro/res"], "is not writable"),
])
def test_eval_bad_options_fail_before_any_work(tmp_path, extra, match):
    from cboprune.evaluation.cli import run_eval_command

    (tmp_path / "afile").write_text("x")
    (tmp_path / "old.json").write_text("{}")
    (tmp_path / "adir.json").mkdir()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    if "ro" in " ".join(extra) and os.access(tmp_path / "ro", os.W_OK):
        pytest.skip("running as root: a read-only folder is writable")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(CBOPruneError, match=match) as exc:
        run_eval_command(_eval_args(*[e.format(tmp=tmp_path) for e in extra]))
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
