"""Teacher outputs cached once serve every student healed on the same data; a stale cache is refused."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from cboprune.core.errors import CBOPruneError
from cboprune.heal import HEALING_FILE, HealConfig, TeacherCache, heal
from cboprune.heal import trainer as trainer_module
from cboprune.models.surgery import remove_blocks, save_pruned

from conftest import save_tiny_checkpoint


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal-cache")
    teacher = save_tiny_checkpoint(root / "teacher", n_layers=4)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    students = []
    for removed in ([1], [1, 2]):
        path = root / ("student-" + "-".join(map(str, removed)))
        save_pruned(remove_blocks(AutoModelForCausalLM.from_pretrained(teacher), removed), tokenizer, path,
                    {"removed": removed})
        students.append(path)
    return teacher, students


def _cfg(teacher, student, shared_data, out, **kw):
    base = dict(student=str(student), teacher=str(teacher), data=str(shared_data / "calib" / "alpaca_en_demo.json"),
                output_dir=str(out), seq_len=32, micro_batch_size=2, global_batch_size=4, max_steps=3,
                learning_rate=3e-3, warmup_ratio=0.0, max_samples=12, heldout_samples=4, teacher_top_k=8)
    base.update(kw)
    return HealConfig(**base)


def test_students_share_one_teacher_pass(models, shared_data, tmp_path, monkeypatch):
    teacher, students = models
    cache = tmp_path / "cache"
    first = heal(_cfg(teacher, students[0], shared_data, tmp_path / "a", teacher_cache=str(cache)), progress=False)
    assert first["teacher_samples_computed"] == 12 + 4  # 3 steps x 4 samples visit all 12 rows, + held-out
    assert first["teacher_precision"] == "cached top-8"

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although the cache holds every row")

    monkeypatch.setattr(trainer_module, "_load_teacher", no_teacher)
    second = heal(_cfg(teacher, students[1], shared_data, tmp_path / "b", teacher_cache=str(cache)), progress=False)
    assert second["teacher_samples_computed"] == 0
    assert second["heldout_loss_before"]["teacher"] == pytest.approx(first["heldout_loss_before"]["teacher"])
    after = second["heldout_loss_after"]
    assert after["kl_to_teacher_topk"] < second["heldout_loss_before"]["kl_to_teacher_topk"]
    assert json.loads((tmp_path / "b" / HEALING_FILE).read_text())["config"]["teacher_cache"] == str(cache)


@pytest.mark.slow
def test_a_stale_or_foreign_cache_is_refused(models, shared_data, tmp_path):
    teacher, students = models
    cache = tmp_path / "cache"
    heal(_cfg(teacher, students[0], shared_data, tmp_path / "a", teacher_cache=str(cache), max_steps=1),
         progress=False)
    for change in ({"seq_len": 24}, {"teacher_top_k": 4}, {"max_samples": 10}):
        with pytest.raises(CBOPruneError, match="another teacher, data"):
            heal(_cfg(teacher, students[0], shared_data, tmp_path / "x", teacher_cache=str(cache), **change),
                 progress=False)
    (cache / "meta.json").write_text("{")
    with pytest.raises(CBOPruneError, match="malformed"):
        heal(_cfg(teacher, students[0], shared_data, tmp_path / "x", teacher_cache=str(cache)), progress=False)
    other = tmp_path / "not-a-cache"
    other.mkdir()
    (other / "file.txt").write_text("x")
    with pytest.raises(CBOPruneError, match="not empty"):
        heal(_cfg(teacher, students[0], shared_data, tmp_path / "x", teacher_cache=str(other)), progress=False)


def test_cache_shards_are_checked(models, shared_data, tmp_path):
    from cboprune.heal.data import load_distillation_data

    teacher, students = models
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    train, held = load_distillation_data(shared_data / "calib" / "alpaca_en_demo.json", tokenizer, seq_len=32,
                                         max_samples=4, heldout_samples=2)
    cache = TeacherCache.for_run(tmp_path / "c", str(teacher), train, held, top_k=4)
    assert cache.fill(AutoModelForCausalLM.from_pretrained(teacher), train, "train", [0, 2]) == 2
    assert cache.missing("train", range(4)) == [1, 3]
    sparse, target = cache.lookup("train", [2, 0], 20)
    assert sparse.indices.shape == (2, 20, 4) and target.shape == (2, 20)
    shard = next((tmp_path / "c").glob("shard-*.safetensors"))
    shard.write_bytes(b"garbage")
    with pytest.raises(CBOPruneError, match="unreadable"):
        TeacherCache.for_run(tmp_path / "c", str(teacher), train, held, top_k=4)
