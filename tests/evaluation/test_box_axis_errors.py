"""Per-axis box errors (``metrics.box_axis_errors``) on boxes worked out by hand, and in the score report."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from reasonknee3d.answer import format_answer
from reasonknee3d.constants import AXIS_NAMES
from reasonknee3d.evaluation.metrics import BOX_AXIS_ERRORS, box_axis_errors
from reasonknee3d.evaluation.report import render_summary
from reasonknee3d.evaluation.score import score_files
from reasonknee3d.schema import get_question

# Two question types, three volumes each; the reference centres move between volumes on every axis.
TRUE = np.array([[10, 14, 20, 24, 30, 34],   # question 1, volume a: centres 12, 22, 32
                 [12, 16, 21, 25, 30, 34],   # question 1, volume b: centres 14, 23, 32
                 [14, 18, 25, 29, 33, 37],   # question 1, volume c: centres 16, 27, 35
                 [0, 2, 40, 44, 5, 9],       # question 2, volume a
                 [1, 3, 42, 46, 5, 9],       # question 2, volume b
                 [5, 7, 40, 44, 8, 12]])     # question 2, volume c
QID = np.array([1, 1, 1, 2, 2, 2])


def test_a_shifted_box_follows_the_anatomy() -> None:
    shift = np.array([0, 0, 2, 2, -1, -1])  # axis 1 two voxels too high, axis 2 one too low
    out = box_axis_errors(TRUE, TRUE + shift, QID, AXIS_NAMES)
    assert out["n"] == 6
    assert out["slice"] == pytest.approx({"centre_abs_error": 0, "centre_bias": 0, "extent_bias": 0,
                                          "tracking": 1, "spread_ratio": 1})
    assert out["row"]["centre_bias"] == pytest.approx(2) and out["row"]["centre_abs_error"] == pytest.approx(2)
    assert out["col"]["centre_bias"] == pytest.approx(-1) and out["col"]["centre_abs_error"] == pytest.approx(1)
    assert out["row"]["tracking"] == pytest.approx(1) and out["col"]["spread_ratio"] == pytest.approx(1)


def test_one_box_per_question_does_not_track() -> None:
    # the majority baseline's kind of answer: the same box for every volume of a question type
    fixed = np.repeat(TRUE[[0, 3]], 3, axis=0)
    out = box_axis_errors(TRUE, fixed, QID, AXIS_NAMES)
    for axis in AXIS_NAMES:
        assert out[axis]["tracking"] is None
        assert out[axis]["spread_ratio"] == 0
    # slice centres of question 1: reference 12, 14, 16 against 12 -> errors 0, -2, -4; question 2: 1, 2, 6 vs 1
    # -> 0, -1, -5; mean -2, mean absolute 2
    assert out["slice"]["centre_bias"] == pytest.approx(-2) and out["slice"]["centre_abs_error"] == pytest.approx(2)


def test_extent_and_anti_tracking() -> None:
    pred = TRUE.copy()
    pred[:, 4] -= 1
    pred[:, 5] += 1                          # axis 2: two voxels wider, same centre
    centre = (TRUE[:, 0] + TRUE[:, 1]) / 2
    means = np.array([14, 14, 14, 3, 3, 3])
    mirrored = 2 * means - centre             # slice centres moved the other way from each question's mean
    pred[:, 0] = np.round(mirrored - 2).astype(int)
    pred[:, 1] = pred[:, 0] + 4
    out = box_axis_errors(TRUE, pred, QID, AXIS_NAMES)
    assert out["col"]["extent_bias"] == pytest.approx(2) and out["col"]["centre_bias"] == pytest.approx(0)
    assert out["slice"]["tracking"] == pytest.approx(-1)
    assert out["slice"]["spread_ratio"] == pytest.approx(1)


def test_no_boxes() -> None:
    out = box_axis_errors(np.zeros((0, 6)), np.zeros((0, 6)), np.zeros(0, int), AXIS_NAMES)
    assert out == {"n": 0, **{a: dict.fromkeys(BOX_AXIS_ERRORS) for a in AXIS_NAMES}}


def test_the_score_report_has_box_errors_for_model_and_majority(tmp_path: Path) -> None:
    q = get_question(1)
    refs, preds = [], []
    for i, (s0, r0) in enumerate([(3, 10), (5, 12), (4, 15), (8, 11)]):
        box = [s0, s0 + 4, r0, r0 + 6, 20, 25]
        grades = {f.key: 0 for f in q.fields}
        refs.append({"sample_id": f"s{i}", "volume_id": f"v{i}", "question_id": 1, "severity": grades, "box": box,
                     "split": "test"})
        moved = [box[0], box[1], box[2] + 1, box[3] + 1, box[4], box[5]]  # one voxel further along rows
        preds.append({"sample_id": f"s{i}", "output": format_answer(q, ["reasoning"], moved, grades)})
    for name, rows in (("p", preds), ("r", refs)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = score_files(tmp_path / "p.jsonl", tmp_path / "r.jsonl", tmp_path / "out", plots=False)
    model, majority = report["box_errors"]["model"], report["box_errors"]["majority_baseline"]
    assert model["n"] == 4
    assert model["row"] == pytest.approx({"centre_abs_error": 1, "centre_bias": 1, "extent_bias": 0, "tracking": 1,
                                          "spread_ratio": 1})
    assert model["slice"]["centre_abs_error"] == 0
    assert all(majority[a]["tracking"] is None and majority[a]["spread_ratio"] == 0 for a in ("slice", "row"))
    # the reference columns never move, so neither quantity is defined there
    assert model["col"]["tracking"] is None and model["col"]["spread_ratio"] is None
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["box_errors"] == report["box_errors"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Box errors per axis" in md and "| row | 1.000 (" in md


def _side_release(tmp_path: Path, sides: tuple[str, ...], name: str) -> Path:
    """References of question 1 whose box sits at one end of the slice axis for right knees, the other for left."""
    q = get_question(1)
    grades = {f.key: 0 for f in q.fields}
    rows = []
    for i, side in enumerate(sides):
        s0 = 2 if side == "right" else 20
        box = [s0, s0 + 4, 10 + i % 3, 16 + i % 3, 20, 25]  # rows move a little between volumes
        rows.append({"sample_id": f"{name}{i}", "volume_id": f"2004_{i}_{side}", "question_id": 1,
                     "severity": grades, "box": box, "split": name})
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_majority_box_per_knee_side(tmp_path: Path) -> None:
    q = get_question(1)
    train = _side_release(tmp_path, ("right", "left") * 6, "train")
    test = _side_release(tmp_path, ("left", "right", "left", "right"), "test")
    refs = [json.loads(line) for line in test.read_text().splitlines()]
    # the model writes each side's box exactly: as good as the side-aware majority box on slices, better on rows
    preds = [{"sample_id": r["sample_id"], "output": format_answer(q, ["reasoning"], r["box"], r["severity"])}
             for r in refs]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    report = score_files(tmp_path / "p.jsonl", test, tmp_path / "out", majority_source=train, plots=False)
    side = report["side_majority_box"]
    # the side-blind median box sits between the two ends of the slice axis and misses both
    assert report["majority_baseline"]["miou"] < 0.2 < side["miou"] < report["overall"]["miou"] == 1
    assert side["box_errors"]["slice"]["centre_abs_error"] == 0
    # compared within knee side, the exact boxes track the rows and the majority box does not move
    assert report["box_errors"]["model"]["row"]["tracking"] == pytest.approx(1)
    assert side["box_errors"]["row"]["spread_ratio"] == 0
    assert "Majority box per question and knee side" in (tmp_path / "out" / "report.md").read_text()
    assert f"knee side: miou {side['miou']:.3f}" in render_summary(report)  # what `score` prints


def test_no_side_majority_without_sides_in_the_volume_ids(tmp_path: Path) -> None:
    refs = _side_release(tmp_path, ("left", "right"), "test")
    text = refs.read_text().replace("_left", "_a").replace("_right", "_b")
    refs.write_text(text)
    (tmp_path / "p.jsonl").write_text("")
    report = score_files(tmp_path / "p.jsonl", refs, tmp_path / "out", plots=False)
    assert report["side_majority_box"] is None
    assert "knee side" not in (tmp_path / "out" / "report.md").read_text()
    assert "knee side" not in render_summary(report)
