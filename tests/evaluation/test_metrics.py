"""Metrics and the majority baseline on small tables worked out by hand (numbers in the comments)."""
from __future__ import annotations

import numpy as np
import pytest

from reasonknee3d.evaluation.metrics import (MISSING, ScoreArrays, acc_iou, balanced_acc, confusion_matrix,
                                             diag_exact, diag_field, farthest_grade, majority_boxes,
                                             majority_grades, miou, qwk, summarize)

M = MISSING


def test_diag_field_and_exact() -> None:
    # pairs: ref 0 has 2 fields (both right), ref 1 has 2 (one wrong), ref 2 has 1 (missing)
    ref = np.array([0, 0, 1, 1, 2])
    true = np.array([1, 2, 0, 0, 3])
    pred = np.array([1, 2, 0, 1, M])
    assert diag_field(true, pred) == pytest.approx(3 / 5)
    assert diag_exact(true, pred, ref) == pytest.approx(1 / 3)
    # references that own no pair in the subset do not count (ref 1 dropped)
    keep = ref != 1
    assert diag_exact(true[keep], pred[keep], ref[keep]) == pytest.approx(1 / 2)
    assert diag_field(np.array([], int), np.array([], int)) is None


def test_balanced_acc_by_hand() -> None:
    # group 0: grade 0 recall 2/3 (one predicted 1), grade 1 recall 1/1 -> 5/6
    # group 1: grade 2 recall 1/2 (one missing)                          -> 1/2
    # mean over groups: (5/6 + 1/2) / 2 = 2/3
    group = np.array([0, 0, 0, 0, 1, 1])
    true = np.array([0, 0, 0, 1, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, M])
    assert balanced_acc(true, pred, group) == pytest.approx(2 / 3)
    # imbalanced: nine 0s right, one 3 wrong -> accuracy 0.9, balanced (1 + 0) / 2 = 0.5
    true = np.array([0] * 9 + [3])
    pred = np.zeros(10, dtype=int)
    assert diag_field(true, pred) == pytest.approx(0.9)
    assert balanced_acc(true, pred, np.zeros(10, dtype=int)) == pytest.approx(0.5)


def test_farthest_grade() -> None:
    assert farthest_grade(np.array([0, 1, 2, 3]), 4).tolist() == [3, 3, 0, 0]


def test_qwk_by_hand() -> None:
    assert qwk(np.array([0, 1, 2, 3]), np.array([0, 1, 2, 3])) == pytest.approx(1.0)
    # true [0,0,1,1], pred [0,1,1,1]; weights (i-j)^2/9.
    # observed/N: (0,0)=.25 (0,1)=.25 (1,1)=.5 -> sum w*O = (1/9)(.25) = 1/36
    # rows (.5,.5), cols (.25,.75): E(0,1)=.375, E(1,0)=.125 -> sum w*E = (1/9)(.5) = 1/18
    # kappa = 1 - (1/36)/(1/18) = 0.5
    assert qwk(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])) == pytest.approx(0.5)
    # missing answers take the farthest grade: true [0,3] -> pred [3,0]; sum w*O = 1, sum w*E = .5 -> -1
    assert qwk(np.array([0, 3]), np.array([M, M])) == pytest.approx(-1.0)
    # undefined (every grade the same on both sides) and empty -> None, never NaN
    assert qwk(np.array([2, 2]), np.array([2, 2])) is None
    assert qwk(np.array([], int), np.array([], int)) is None


def test_iou_metrics() -> None:
    iou = np.array([1.0, 0.5, 0.2, 0.0])
    assert miou(iou) == pytest.approx(0.425)
    assert acc_iou(iou, 0.25) == pytest.approx(0.5)
    assert acc_iou(iou, 0.5) == pytest.approx(0.5)  # 0.5 itself counts
    assert miou(np.array([])) is None


def test_confusion_matrix_has_a_missing_column() -> None:
    cm = confusion_matrix(np.array([0, 0, 1, 3]), np.array([0, M, 1, 2]), 4)
    assert cm.tolist() == [[1, 0, 0, 0, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]]


def test_majority_grades_ties_take_the_smallest() -> None:
    field = np.array([0, 0, 0, 1, 1, 2, 2])
    grade = np.array([1, 1, 2, 3, 0, 2, 1])
    # field 0: 1 twice; field 1: 0/3 tie -> 0; field 2: 1/2 tie -> 1; field 3 never seen -> MISSING
    assert majority_grades(field, grade, 4).tolist() == [1, 0, 1, M]


def test_majority_boxes_per_coordinate_median_rounded_down() -> None:
    boxes = np.array([[0, 10, 0, 0, 0, 0], [2, 12, 1, 1, 0, 0], [4, 20, 2, 2, 0, 0], [7, 30, 3, 3, 0, 0],
                      [5, 5, 5, 5, 5, 5]])
    qid = np.array([3, 3, 3, 3, 9])
    # q3 medians: (2+4)/2=3, (12+20)/2=16, 1.5->1, 1.5->1, 0, 0
    assert majority_boxes(qid, boxes) == {3: [3, 16, 1, 1, 0, 0], 9: [5, 5, 5, 5, 5, 5]}


def test_summarize_subsets_and_support() -> None:
    # 3 references: r0 (2 fields, box, exact, IoU 1), r1 (1 field, box, unparsed), r2 (1 field, no box)
    a = ScoreArrays(pair_ref=np.array([0, 0, 1, 2]), pair_group=np.array([0, 1, 0, 2]),
                    pair_true=np.array([1, 2, 3, 0]), pair_pred=np.array([1, 2, M, 1]),
                    pair_ordinal=np.array([True, True, True, False]), has_box=np.array([True, True, False]),
                    iou=np.array([1.0, 0.0, 0.0]), severity_found=np.array([True, False, True]),
                    box_found=np.array([True, False, False]))
    values, support = summarize(a)
    assert values["diag_exact"] == pytest.approx(1 / 3)
    assert values["diag_field"] == pytest.approx(2 / 4)
    assert values["miou"] == pytest.approx(0.5) and values["acc_iou50"] == pytest.approx(0.5)
    assert values["parse_fail_severity"] == pytest.approx(1 / 3)
    assert values["parse_fail_box"] == pytest.approx(1 / 2)
    assert support["diag_field"] == {"n": 4, "parse_failures": 1}
    assert support["qwk"] == {"n": 3, "parse_failures": 1}
    assert support["miou"] == {"n": 2, "parse_failures": 1}
    # subset with only r2: no box -> IoU metrics None; one wrong field
    values, _ = summarize(a, np.array([False, False, True]))
    assert values["miou"] is None and values["parse_fail_box"] is None
    assert values["diag_exact"] == 0.0 and values["qwk"] is None
