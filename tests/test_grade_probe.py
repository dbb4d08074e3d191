"""scripts/grade_probe.py: the AUC by hand, and the probe's per-category counts against the release's grades."""
from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path

import pytest

from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.models import save_model_dir
from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import build_reasonknee3d
from reasonknee3d.schema import get_question

SCRIPT = Path(__file__).parents[1] / "scripts" / "grade_probe.py"
_spec = importlib.util.spec_from_file_location("grade_probe", SCRIPT)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _tiny_model_dir(tmp_path: Path, shape: tuple[int, int, int]) -> Path:
    model, processor = build_reasonknee3d(
        {"language_model": {"tiny": {"hidden_size": 32, "intermediate_size": 64, "bpe_vocab_size": 300}},
         "encoder": {"patch_size": [4, 8, 8], "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32}, "num_bins": 32},
        {"input_shape": list(shape)})
    return save_model_dir(model, processor, tmp_path / "model")


def test_roc_auc_by_hand():
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right
    assert probe.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert probe.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts half
    assert probe.roc_auc([1, 1], [0.1, 0.2]) is None


def test_grade_decision_by_hand():
    # Abnormal grades together (0.5) outweigh grade 0 (0.4), but greedy writes grade 0: the split the probe counts.
    assert probe.grade_decision({0: 0.4, 1: 0.2, 2: 0.2, 3: 0.1}) == (True, False)
    assert probe.grade_decision({0: 0.3, 1: 0.5, 2: 0.1}) == (True, True)
    assert probe.grade_decision({0: 0.7, 1: 0.2}) == (False, False)


def test_prior_corrected_decision_by_hand():
    # Grade 0 is 9x as frequent in training: 0.6 / 9.5 < 0.3 / 1.5 (add-one counts), so grade 1 wins.
    counts = collections.Counter({0: 9, 1: 1, 2: 0})
    assert probe.prior_corrected({0: 0.6, 1: 0.3, 2: 0.1}, counts) == 1
    assert probe.prior_corrected({0: 0.95, 1: 0.04, 2: 0.01}, counts) == 0
    # An unseen grade counts once: 0.2 / 1 beats 0.6 / 10 and 0.2 / 2.
    assert probe.prior_corrected({0: 0.6, 1: 0.2, 2: 0.2}, counts) == 2


def test_probe_counts_every_sample_and_its_reference_grade(tmp_path: Path, capsys) -> None:
    shape = (16, 32, 32)
    release = tmp_path / "release"
    write_synthetic_release(release, n_volumes=6, shape=shape, seed=1, questions=[1, 30, 44])
    model_dir = _tiny_model_dir(tmp_path, shape)
    result = probe.grade_probe(str(model_dir), str(release), "train", batch_size=4)

    rows = json.loads((release / "data" / "generate_data" / "train.json").read_text())
    expected: dict[str, list[int]] = {}
    for r in rows:
        spec = get_question(r["question_id"])
        grade = next(iter(r["final_diagnosis"].values()))[spec.fields[0].key]
        expected.setdefault(spec.category, []).append(int(grade != 0))
    overall = result.pop(probe.ALL)
    assert {c: (r["n"], r["abnormal"]) for c, r in result.items()} == \
        {c: (len(y), sum(y)) for c, y in expected.items()}
    assert (overall["n"], overall["abnormal"]) == (len(rows), sum(sum(y) for y in expected.values()))
    for r in [*result.values(), overall]:
        for key in ("balanced", "balanced_prior", "balanced_majority"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0
    for r in result.values():
        assert r["auc"] is None or 0.0 <= r["auc"] <= 1.0
        assert r["abnormal_greedy"] <= r["abnormal_decided"] <= r["abnormal"]
        assert r["abnormal_more_probable"] <= r["abnormal_decided"]

    assert probe.main(["--model", str(model_dir), "--data", str(release), "--split", "train", "--limit", "3",
                       "--shuffle-volumes"]) == 0
    assert "bone_marrow_lesion" in capsys.readouterr().out


def test_answers_in_another_format_are_skipped_and_listed(tmp_path: Path, capsys, monkeypatch) -> None:
    shape = (16, 32, 32)
    release = tmp_path / "release"
    write_synthetic_release(release, n_volumes=4, shape=shape, seed=1, questions=[1])
    model_dir = _tiny_model_dir(tmp_path, shape)
    from reasonknee3d.data.dataset import VolumeQADataset
    original = VolumeQADataset.__getitem__

    def free_text_first(self, index):  # the first sample's answer is prose without field lines
        item = original(self, index)
        return {**item, "answer": "No lesion seen."} if index == 0 else item

    monkeypatch.setattr(VolumeQADataset, "__getitem__", free_text_first)
    result = probe.grade_probe(str(model_dir), str(release), "train", batch_size=4)
    n_train = len(json.loads((release / "data" / "generate_data" / "train.json").read_text()))
    assert result["bone_marrow_lesion"]["n"] == n_train - 1
    assert "skipped 1 of" in capsys.readouterr().err
