"""The direct 3D classifier (``evaluation/classify.py``): a region_grades folder grades each sample in a box."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from reasonknee3d.cli import main
from reasonknee3d.data.cache import VolumeCache
from reasonknee3d.data.release import cache_root, iter_samples
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.evaluation.classify import _box_for, classify, load_region_classifier, median_train_boxes
from reasonknee3d.evaluation.metrics import majority_boxes
from reasonknee3d.evaluation.predictions_io import read_predictions
from reasonknee3d.evaluation.score import score_files
from reasonknee3d.families import load_experiment_config
from reasonknee3d.boxes import mirror_boxes, scale_boxes
from reasonknee3d.models.reasonknee3d.region_heads import (HEADS_WEIGHTS, box_cells, head_key,
                                                          load_region_grade_model)
from reasonknee3d.parsing import parse_output
from reasonknee3d.schema import get_question
from reasonknee3d.training.trainer import run_training

SHAPE = (16, 32, 32)
ENCODER = ('model.encoder={"patch_size": [4, 8, 8], "hidden_size": 16, "num_hidden_layers": 1, '
           '"num_attention_heads": 2, "intermediate_size": 32}')


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-volume release (question 44 has no box) and a region_grades folder trained on it for a few steps."""
    root = tmp_path_factory.mktemp("classify")
    release = root / "release"
    write_synthetic_release(release, n_volumes=6, shape=SHAPE, seed=1, questions=[1, 2, 30, 44])
    exp = load_experiment_config("tiny_3d", [
        ENCODER, f"data.input_shape={list(SHAPE)}", "model.region_size=null", "model.num_bins=32",
        "train.stage=region_grades", "train.encoder=full", "train.projector=frozen", "train.language_model=frozen",
        "train.new_token_rows=false", "train.pretrain.roi=grid", f"train.data_dir={json.dumps(str(release))}",
        f"train.output_dir={json.dumps(str(root / 'rg'))}", "train.max_steps=4", "train.logging_steps=2",
        "train.per_device_batch_size=2", "train.learning_rate=3e-3"])
    torch.manual_seed(0)
    run_training(exp)
    # Heads a few steps of training leave near their init grade about the same everywhere; random heads at a
    # large scale make the grades depend on the pooled feature, so comparing them checks the box and pooling.
    import shutil

    from safetensors.torch import load_file, save_file
    sharp = root / "rg_sharp"
    shutil.copytree(root / "rg", sharp)
    gen = torch.Generator().manual_seed(0)
    heads = {k: (torch.randn(v.shape, generator=gen) * 50.0 if k.endswith(".weight") else torch.zeros_like(v))
             for k, v in load_file(str(sharp / HEADS_WEIGHTS)).items()}
    save_file(heads, str(sharp / HEADS_WEIGHTS))
    return release, sharp


def _expected_grades(rg: Path, release: Path, sample, box_in_stored_voxels) -> dict[str, int]:
    """The grades of one sample computed step by step: encoder on the cached volume, mean of the features of the
    grid cells the box overlaps, argmax of each field's head among the field's grades."""
    clf = load_region_classifier(rg)
    cache = VolumeCache(cache_root(release) / "volumes", clf.prep)
    volume, meta = cache.read_tensor(sample.image_path)
    inp = tuple(volume.shape[1:])
    box = scale_boxes(box_in_stored_voxels, meta["orig_shape"], inp)
    if clf.prep.mirrors(sample.image_path, sample.knee_side):
        box = mirror_boxes(box, inp)
    with torch.no_grad():
        features, grid = clf.model.encoder(volume[None].float())
    cube = features[0].view(*grid, -1)
    pooled = cube[tuple(box_cells([int(v) for v in box], inp, grid))].reshape(-1, cube.shape[-1]).mean(0)
    spec = get_question(sample.question_id)
    out = {}
    for f in spec.fields:
        key = head_key(spec.category, f.key)
        with torch.no_grad():
            logits = clf.model.heads[key](pooled)
        classes = clf.model.grades[key]
        out[f.key] = max((g for g in classes if g in f.grades), key=lambda g: float(logits[classes.index(g)]))
    return out


def test_reference_boxes_give_the_heads_argmax_in_that_box_and_iou_one(trained, tmp_path) -> None:
    release, rg = trained
    forwards = []
    out = tmp_path / "p.jsonl"
    # Count encoder forwards: one per batch of volumes, however many questions each volume has.
    from reasonknee3d.evaluation import classify as classify_module
    real = classify_module.load_region_classifier

    def counting(*args, **kwargs):
        clf = real(*args, **kwargs)
        clf.model.encoder.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
        return clf
    classify_module.load_region_classifier = counting
    try:
        result = classify(rg, release, "test", out, batch_size=2)
    finally:
        classify_module.load_region_classifier = real
    samples = list(iter_samples(release, "test"))
    n_volumes = len({s.image_path for s in samples})
    assert result.n_written == len(samples) and not result.skipped
    assert sum(forwards) == n_volumes and len(forwards) == -(-n_volumes // 2)
    assert result.box_sources == {"reference": len(samples), "predictions": 0, "median_train_box": 0,
                                  "whole_volume": 0}
    rows = {r["sample_id"]: r for r in read_predictions(out)}
    for s in samples:
        parsed = parse_output(rows[s.sample_id]["output"], get_question(s.question_id))
        assert parsed.box == s.box
        assert None not in parsed.severity.values()
    boxed = [s for s in samples if s.box is not None]
    for s in boxed[:4]:
        parsed = parse_output(rows[s.sample_id]["output"], get_question(s.question_id))
        assert parsed.severity == _expected_grades(rg, release, s, s.box)
    # The grades vary between samples (the check above is not one constant answer compared with itself).
    first_grades = {(s.question_id, tuple(parse_output(rows[s.sample_id]["output"],
                                                       get_question(s.question_id)).severity.values()))
                    for s in boxed}
    assert len(first_grades) > len({s.question_id for s in boxed})
    refs = tmp_path / "refs.jsonl"
    from reasonknee3d.data.release import export_references
    export_references(release, "test", refs)
    report = score_files(out, refs, tmp_path / "report", plots=False)
    assert report["overall"]["miou"] == pytest.approx(1.0)
    assert report["overall"]["parse_fail_severity"] == 0.0


def test_boxes_from_predictions_with_fallback_to_the_median_train_box(trained, tmp_path) -> None:
    release, rg = trained
    samples = [s for s in iter_samples(release, "test") if s.box is not None]
    shape = SHAPE
    own = [2, 9, 3, 20, 4, 25]  # a box that is no reference box
    outside = [-5, 40, 3, 20, 4, 99]  # clipped to the volume
    given = tmp_path / "model_predictions.jsonl"
    lines = [{"sample_id": samples[0].sample_id, "output": f"Location: <|box_start|>{own}<|box_end|>"},
             {"sample_id": samples[1].sample_id, "output": "no box here"},
             {"sample_id": samples[2].sample_id, "output": f"Location: <|box_start|>{outside}<|box_end|>"},
             {"sample_id": "not-in-this-split:q1", "output": "x"}]
    given.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "p.jsonl"
    result = classify(rg, release, "test", out, boxes=given)
    n_all = len(list(iter_samples(release, "test")))
    assert result.n_written == n_all
    assert result.box_sources["predictions"] == 2
    assert result.box_sources["median_train_box"] == len(samples) - 2
    rows = {r["sample_id"]: r for r in read_predictions(out)}

    def box_of(s):
        return parse_output(rows[s.sample_id]["output"], get_question(s.question_id)).box
    assert box_of(samples[0]) == own
    assert box_of(samples[2]) == [0, shape[0] - 1, 3, 20, 4, shape[2] - 1]
    train = [s for s in iter_samples(release, "train") if s.box is not None]
    medians = majority_boxes(np.array([s.question_id for s in train]), np.array([s.box for s in train]))
    assert median_train_boxes(release) == medians
    assert box_of(samples[1]) == medians[samples[1].question_id]
    parsed = parse_output(rows[samples[0].sample_id]["output"], get_question(samples[0].question_id))
    assert parsed.severity == _expected_grades(rg, release, samples[0], own)


def test_rerun_resumes_and_the_cli_detects_a_region_grades_folder(trained, tmp_path, capsys) -> None:
    release, rg = trained
    out = tmp_path / "p.jsonl"
    first = classify(rg, release, "test", out, limit=3)
    assert first.n_written == 3
    assert main(["predict", "--model", str(rg), "--data", str(release), "--split", "test", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    n = len(list(iter_samples(release, "test")))
    assert f"{n - 3} written, 3 already done, of {n}" in printed and "boxes: " in printed
    ids = [r["sample_id"] for r in read_predictions(out)]
    assert len(ids) == len(set(ids)) == n
    # --boxes with a folder that is not a region_grades one, or a boxes file that does not exist: exit 2, named.
    assert main(["predict", "--model", str(tmp_path), "--data", str(release), "--out", str(tmp_path / "q.jsonl"),
                 "--boxes", "reference"]) == 2
    assert "--boxes is for a region_grades folder" in capsys.readouterr().err
    assert main(["predict", "--model", str(rg), "--data", str(release), "--out", str(tmp_path / "q.jsonl"),
                 "--boxes", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: no such predictions file" in capsys.readouterr().err


def test_a_question_without_a_box_is_graded_on_the_whole_volume(trained) -> None:
    release, rg = trained
    sample = next(iter(iter_samples(release, "test")))
    # The synthetic release boxes every question; a real item without a region has box None.
    assert _box_for(dataclasses.replace(sample, box=None), True, {}, {}) == (None, "whole_volume")
    assert _box_for(dataclasses.replace(sample, box=None), False, {sample.sample_id: [0] * 6}, {}) == \
        (None, "whole_volume")
    assert _box_for(sample, False, {}, {}) == (None, "whole_volume")  # no box parsed, no train median
    clf = load_region_classifier(rg)
    volumes = torch.randn(1, 1, *SHAPE)
    spec = get_question(sample.question_id)
    whole = [0, SHAPE[0] - 1, 0, SHAPE[1] - 1, 0, SHAPE[2] - 1]
    assert clf.grade(volumes, [(0, None)], [spec]) == clf.grade(volumes, [(0, whole)], [spec])


def test_loader_errors_name_the_file(trained, tmp_path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file
    _, rg = trained
    copy = tmp_path / "rg"
    shutil.copytree(rg, copy)
    weights = load_file(str(copy / HEADS_WEIGHTS))
    key = next(k for k in weights if k.endswith(".weight"))
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)
    save_file(weights, str(copy / HEADS_WEIGHTS))
    with pytest.raises(ValueError, match=f"{HEADS_WEIGHTS}: .* has shape"):
        load_region_grade_model(copy)
    (copy / "region_heads.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a region_grades output folder"):
        load_region_grade_model(copy)


def test_an_unreadable_cached_volume_skips_its_samples_and_lists_them(trained, tmp_path, monkeypatch) -> None:
    release, rg = trained
    samples = list(iter_samples(release, "test"))
    bad = samples[0].image_path
    real = VolumeCache.read_tensor

    def read(self, image_path):
        if Path(image_path) == Path(bad):
            raise OSError("truncated file")
        return real(self, image_path)
    monkeypatch.setattr(VolumeCache, "read_tensor", read)
    out = tmp_path / "p.jsonl"
    result = classify(rg, release, "test", out)
    lost = [s.sample_id for s in samples if s.image_path == bad]
    assert sorted(sk.item for sk in result.skipped) == sorted(lost)
    assert "truncated file" in result.skipped[0].reason
    assert result.n_written == len(samples) - len(lost)
    listed = [json.loads(line) for line in result.skipped_path.read_text().splitlines()]
    assert len(listed) == len(lost)


def test_classifier_auc_script_counts_the_split_and_ranks_by_the_heads(trained, monkeypatch) -> None:
    """scripts/classifier_auc.py: per category, the boxed samples and abnormal references of the split, and an
    AUC of 1 when the grade-0 probability is made to follow the reference (planted through the pooled feature)."""
    import importlib.util

    scripts = Path(__file__).resolve().parents[2] / "scripts"
    monkeypatch.syspath_prepend(str(scripts))
    spec = importlib.util.spec_from_file_location("classifier_auc", scripts / "classifier_auc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    release, rg = trained
    samples = [s for s in iter_samples(release, "test") if s.box is not None]
    result = module.classifier_auc(str(rg), str(release))
    for category, r in result.items():
        mine = [s for s in samples if get_question(s.question_id).category == category]
        assert r["n"] == len(mine)
        assert r["abnormal"] == sum(s.severity[get_question(s.question_id).fields[0].key] != 0 for s in mine)
        assert r["auc"] is None or 0.0 <= r["auc"] <= 1.0
    # Plant the truth: roi_pool returns a feature whose first entry says whether the reference is abnormal, and
    # every head's grade-0 logit is minus that entry, so the AUC of every category with both kinds is 1.
    truth = iter([float(s.severity[get_question(s.question_id).fields[0].key] != 0)
                  for path in dict.fromkeys(s.image_path for s in samples)
                  for s in samples if s.image_path == path])

    def planted(volumes, rows, boxes):
        out = torch.zeros(len(rows), clf_width[0])
        out[:, 0] = torch.tensor([next(truth) for _ in rows])
        return out
    real_load = module.load_region_classifier
    clf_width = []

    def load(path):
        clf = real_load(path)
        clf_width.append(clf.model.feature_size)
        clf.model.roi_features = planted
        with torch.no_grad():
            for key, head in clf.model.heads.items():
                head.weight.zero_()
                head.bias.zero_()
                head.weight[clf.model.grades[key].index(0), 0] = -10.0
        return clf
    monkeypatch.setattr(module, "load_region_classifier", load)
    mixed = [r for r in module.classifier_auc(str(rg), str(release)).values() if 0 < r["abnormal"] < r["n"]]
    assert mixed and all(r["auc"] == pytest.approx(1.0) for r in mixed)


def test_recentred_preprocessing_grades_the_boxes_in_the_moved_frame(trained, tmp_path, monkeypatch) -> None:
    """With data.recentre the rois go into each cached volume's moved (and mirrored) frame; the written boxes stay
    the stored reference boxes."""
    import dataclasses

    import numpy as np

    from reasonknee3d.boxes import clip_boxes
    from reasonknee3d.evaluation import classify as classify_module
    release, rg = trained
    real = classify_module.load_region_classifier
    seen = []

    def recentred(*args, **kwargs):
        clf = real(*args, **kwargs)
        clf.prep = dataclasses.replace(clf.prep, recentre="centroid", cache_dir=str(tmp_path / "cache"))
        grade = clf.grade
        clf.grade = lambda volumes, rois, specs: seen.extend(rois) or grade(volumes, rois, specs)
        return clf
    monkeypatch.setattr(classify_module, "load_region_classifier", recentred)
    out = tmp_path / "p.jsonl"
    result = classify(rg, release, "test", out, batch_size=2, cache_dir=tmp_path / "cache")
    samples = list(iter_samples(release, "test"))
    assert result.n_written == len(samples) and len(seen) == len(samples)
    rows = {r["sample_id"]: r for r in read_predictions(out)}
    prep = dataclasses.replace(real(rg).prep, recentre="centroid", cache_dir=str(tmp_path / "cache"))
    cache = VolumeCache(tmp_path / "cache" / "volumes", prep)
    model_boxes = [roi for _, roi in seen]
    moved = 0
    for s in samples:
        assert parse_output(rows[s.sample_id]["output"], get_question(s.question_id)).box == s.box
        if s.box is None:
            continue
        offset = cache.load(s.image_path)[1]["offset"]
        box = mirror_boxes(s.box, SHAPE) if prep.mirrors(s.image_path, s.knee_side) else np.asarray(s.box)
        assert [int(v) for v in clip_boxes(box + np.repeat(offset, 2), SHAPE)] in model_boxes
        moved += any(offset)
    assert moved > 0
