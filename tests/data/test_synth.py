"""Synthetic release: layout, CSVs, items, question files, splits, grades, determinism, box baseline."""
from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from reasonknee3d.answer import check_severity, format_answer
from reasonknee3d.boxes import box_from_mask, iou_3d, validate_box
from reasonknee3d.data.phantom import FOV_MM, label_names, render_phantom
from reasonknee3d.data.synth import (CSV_COLUMNS, SPLITS, balanced_subset, plan_volumes, sample_severities,
                                     write_synthetic_release)
from reasonknee3d.moaks import NO_TEAR, normal_grade
from reasonknee3d.schema import load_schema

SHAPE = (24, 48, 48)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "release"
    summary = write_synthetic_release(root, n_volumes=5, shape=SHAPE, seed=3)
    assert summary.volumes == {s: len(_rows(root, s)) for s in SPLITS}
    assert "volumes: train" in str(summary) and "MiB on disk" in str(summary)
    return root


def _rows(root: Path, split: str) -> list[dict[str, str]]:
    with open(root / "data" / "split_files" / f"{split}_split.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        return list(reader)


def _json(root: Path, rel: str):
    return json.loads((root / rel).read_text())


def test_split_csvs_are_patient_disjoint_and_point_at_volumes(release: Path) -> None:
    rows = {s: _rows(release, s) for s in SPLITS}
    assert sum(len(r) for r in rows.values()) == 5 and all(rows.values())  # 5 volumes = at least 3 patients
    patients = {s: {r["patient_id"] for r in rs} for s, rs in rows.items()}
    assert not (patients["train"] & patients["val"] or patients["train"] & patients["test"]
                or patients["val"] & patients["test"])
    for r in (r for rs in rows.values() for r in rs):
        assert re.fullmatch(r"9\d{6}", r["patient_id"]) and re.fullmatch(r"\d\dm", r["time"])
        assert r["knee_side"] in ("right", "left")
        assert r["path"] == f"{r['patient_id']}/{r['time']}/{r['study_folder']}/{r['series_folder']}"
        assert r["image_filepath"] == (f"images/{r['patient_id']}/{r['time']}/{r['study_folder']}_"
                                       f"{r['series_folder']}_{r['knee_side']}.nii.gz")
        assert re.fullmatch(r"masks/knee_\d{3}\.nii\.gz", r["label_filepath"])
        assert (release / r["image_filepath"]).is_file() and (release / r["label_filepath"]).is_file()


def test_images_and_masks_share_shape_and_a_realistic_affine(release: Path) -> None:
    for r in _rows(release, "train"):
        img, mask = nib.load(release / r["image_filepath"]), nib.load(release / r["label_filepath"])
        assert img.get_data_dtype() == np.int16 and mask.get_data_dtype() == np.uint8
        assert img.shape == mask.shape == SHAPE
        assert np.allclose(img.affine, mask.affine)
        assert np.allclose(img.header.get_zooms(), np.asarray(FOV_MM) / SHAPE)
        labels = np.asarray(mask.dataobj)
        assert set(np.unique(labels)) == {0, *label_names()}


def test_items_hold_every_question_with_a_valid_severity_and_the_mask_box(release: Path) -> None:
    schema = load_schema()
    questions = _json(release, "data/question_files/questions.json")
    mapping = _json(release, "data/question_files/question_subregion_mapping.json")
    cot = _json(release, "data/question_files/cot_question_mapping.json")
    for split in SPLITS:
        items = _json(release, f"data/generate_data/{split}.json")
        images = [r["image_filepath"] for r in _rows(release, split)]
        assert Counter(it["image"] for it in items) == {im: 69 for im in images}
        masks = {r["image_filepath"]: np.asarray(nib.load(release / r["label_filepath"]).dataobj)
                 for r in _rows(release, split)}
        for it in items:
            q = it["question_id"]
            spec = schema[q]
            assert set(it) == {"image", "question_id", "prompt", "answer", "final_diagnosis", "box"}
            assert it["prompt"] == questions[str(q)]
            sev = check_severity(spec, it["final_diagnosis"][spec.finding_key])
            assert list(it["final_diagnosis"]) == [spec.finding_key]
            box = validate_box(it["box"], SHAPE)
            assert box == box_from_mask(masks[it["image"]], mapping[str(q)])
            reasoning = [s for f in spec.fields for s in cot[str(q)][f.key][str(sev[f.key])]]
            assert it["answer"] == format_answer(spec, reasoning, box, sev)


def test_question_files_cover_all_questions_grades_and_labels(release: Path) -> None:
    schema = load_schema()
    qdir = "data/question_files/"
    labels = _json(release, qdir + "labels.json")
    assert labels == {str(i): n for i, n in label_names().items()}
    mapping = _json(release, qdir + "question_subregion_mapping.json")
    grade_dict = _json(release, qdir + "grade_dict.json")
    cot = _json(release, qdir + "cot_question_mapping.json")
    for name in ("questions", "question_subregion_mapping", "cot_question_mapping", "grade_dict"):
        assert sorted(int(q) for q in _json(release, qdir + f"{name}.json")) == sorted(schema)
    for q, spec in schema.items():
        assert mapping[str(q)] and all(str(i) in labels for i in mapping[str(q)])
        for f in spec.fields:
            assert sorted(int(g) for g in grade_dict[str(q)][f.key]) == list(f.grades)
            assert sorted(int(g) for g in cot[str(q)][f.key]) == list(f.grades)


def test_test_balanced_is_a_grade_balanced_subset_of_test(release: Path) -> None:
    test = _json(release, "data/generate_data/test.json")
    balanced = _json(release, "data/generate_data/test_balanced.json")
    assert balanced == balanced_subset(test) and all(it in test for it in balanced)
    schema = load_schema()
    per_q: dict[int, Counter] = {}
    for it in balanced:
        spec = schema[it["question_id"]]
        per_q.setdefault(it["question_id"], Counter())[it["final_diagnosis"][spec.finding_key][spec.fields[0].key]] += 1
    assert set(per_q) == set(schema)
    for counts in per_q.values():
        assert len(set(counts.values())) == 1


def test_balanced_subset_equalizes_grade_counts() -> None:
    items = [{"question_id": 43, "final_diagnosis": {"effusion-synovitis": {"grade": g}}} for g in (0, 0, 0, 1, 2, 2)]
    assert [it["final_diagnosis"]["effusion-synovitis"]["grade"] for it in balanced_subset(items)] == [0, 1, 2]
    only_normal = [{"question_id": 56, "final_diagnosis": {"medial_meniscal_hypertrophy": {"presence": 0}}}] * 3
    assert len(balanced_subset(only_normal)) == 1


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    a = write_synthetic_release(tmp_path / "a", 2, (16, 32, 32), seed=7)
    write_synthetic_release(tmp_path / "b", 2, (16, 32, 32), seed=7)
    write_synthetic_release(tmp_path / "c", 2, (16, 32, 32), seed=8)
    fa = files(tmp_path / "a")
    assert fa == files(tmp_path / "b") and a.files == len(fa)
    assert fa.keys() != files(tmp_path / "c").keys()  # new patients and series names
    assert fa["data/generate_data/train.json"] != files(tmp_path / "c")["data/generate_data/train.json"]


def test_question_subset_and_bad_arguments(tmp_path: Path) -> None:
    write_synthetic_release(tmp_path / "sub", 1, (16, 32, 32), seed=0, questions=[43, 1])
    items = _json(tmp_path / "sub", "data/generate_data/train.json")
    assert [it["question_id"] for it in items] == [1, 43]
    assert list(_json(tmp_path / "sub", "data/question_files/questions.json")) == ["1", "43"]
    with pytest.raises(FileExistsError, match="is not empty"):
        write_synthetic_release(tmp_path / "sub", 1, (16, 32, 32), seed=0)
    with pytest.raises(ValueError, match=r"unknown ids \[70\]"):
        write_synthetic_release(tmp_path / "x", 1, (16, 32, 32), seed=0, questions=[1, 70])
    with pytest.raises(ValueError, match=r"shape \(12, 32, 32\)"):
        write_synthetic_release(tmp_path / "y", 1, (12, 32, 32), seed=0)
    with pytest.raises(ValueError, match="at least one volume"):
        write_synthetic_release(tmp_path / "z", 0, (16, 32, 32), seed=0)


def test_plan_has_follow_ups_and_roughly_70_10_20_patients() -> None:
    plans = plan_volumes(200, np.random.default_rng(0))
    by_patient: dict[str, list] = {}
    for p in plans:
        by_patient.setdefault(p.patient_id, []).append(p)
    assert any(len(v) == 2 for v in by_patient.values())
    for visits in by_patient.values():
        assert len({v.split for v in visits}) == 1 and len({v.knee_side for v in visits}) == 1
        assert [v.time for v in visits][0] == "00m" and len({v.time for v in visits}) == len(visits)
    share = Counter(v[0].split for v in by_patient.values())
    n = len(by_patient)
    assert abs(share["train"] / n - 0.7) < 0.02 and abs(share["test"] / n - 0.2) < 0.02
    assert len({p.image_filepath for p in plans}) == 200


def test_grades_are_imbalanced_consistent_and_complete() -> None:
    schema = load_schema()
    nine = sample_severities(9, np.random.default_rng(1))  # 9 volumes show all 9 morphology codes
    assert all({s[q][f.key] for s in nine} == set(f.grades) for q, spec in schema.items() for f in spec.fields)
    sev = sample_severities(300, np.random.default_rng(0))
    majority = []
    for q, spec in schema.items():
        for f in spec.fields:
            counts = Counter(s[q][f.key] for s in sev)
            assert set(counts) == set(f.grades), (q, f.key)
            assert counts.most_common(1)[0][0] == normal_grade(spec, f.key)  # normal is the majority
            majority.append(counts.most_common(1)[0][1] / len(sev))
    assert 0.65 < np.mean(majority) < 0.8
    for s in sev:
        for q in (1, 15):  # BML: no lesion means no number and no percentage
            values = list(s[q].values())
            assert (values[0] == 0) == (values[1] == 0) == (values[2] == 0)
        # No defect, no full-thickness loss; a defect may be partial thickness only (depth 0).
        assert s[16]["Size of lesion"] > 0 or s[16]["Depth of lesion"] == 0
        assert s[54]["presence"] == 1 or s[54]["tear_location"] == NO_TEAR  # no cyst: no tear code


def test_a_fixed_box_per_question_localizes_poorly(tmp_path: Path) -> None:
    write_synthetic_release(tmp_path / "r", 12, SHAPE, seed=0)
    items = [it for s in SPLITS for it in _json(tmp_path / "r", f"data/generate_data/{s}.json")]
    ious = []
    for q in load_schema():
        boxes = np.array([it["box"] for it in items if it["question_id"] == q])
        ious.append(iou_3d(boxes, np.floor(np.median(boxes, axis=0))))
    assert float(np.mean(np.concatenate(ious))) < 0.35


def test_a_pose_that_loses_a_label_is_repositioned(tmp_path: Path, monkeypatch) -> None:
    from reasonknee3d.data import synth
    calls = []

    def flaky(shape, anatomy, severities, rng):
        calls.append(anatomy)
        if len(calls) == 1:
            raise synth.LabelsLostError("lost labels ['prepatellar bursa site']")
        return render_phantom(shape, anatomy, severities, rng)
    monkeypatch.setattr(synth, "render_phantom", flaky)
    write_synthetic_release(tmp_path / "r", 1, (16, 32, 32), seed=0)
    assert len(calls) == 2 and calls[1].shift_mm != calls[0].shift_mm
    assert calls[1].scale == calls[0].scale  # same patient, new position
