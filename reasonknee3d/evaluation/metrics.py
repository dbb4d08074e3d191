"""ReasonKnee-Bench metrics and the majority baseline (docs/benchmark.md, "Metrics"), in plain numpy.

Severity is scored per (reference, field) *pair*: arrays of equal length hold the reference index, the
(category, field key) group, the true grade and the predicted grade, with ``MISSING`` (-1) where the
output gave no valid grade. Localization is scored per reference from an IoU array (IoU 0 for a
missing box). Every function is vectorized; ``summarize`` computes the whole metric set on any subset.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

MISSING = -1
"""Predicted grade of a field the output did not answer (or answered outside the field's range)."""

METRICS = ("diag_exact", "diag_field", "balanced_acc", "qwk", "miou", "acc_iou25", "acc_iou50",
           "parse_fail_severity", "parse_fail_box")
"""Metric names in report order."""


def _fraction(mask: np.ndarray) -> Optional[float]:
    return float(mask.mean()) if mask.size else None


def diag_field(true: np.ndarray, pred: np.ndarray) -> Optional[float]:
    """Fraction of (reference, field) pairs predicted exactly; None without pairs."""
    return _fraction(np.asarray(true) == np.asarray(pred))


def diag_exact(true: np.ndarray, pred: np.ndarray, ref_index: np.ndarray) -> Optional[float]:
    """Fraction of references (those that own at least one of the pairs) whose every field is exact."""
    ref_index = np.asarray(ref_index)
    if ref_index.size == 0:
        return None
    n = int(ref_index.max()) + 1
    pairs = np.bincount(ref_index, minlength=n)
    wrong = np.bincount(ref_index, weights=np.asarray(true) != np.asarray(pred), minlength=n)
    present = pairs > 0
    return float((wrong[present] == 0).mean())


def balanced_acc(true: np.ndarray, pred: np.ndarray, group: np.ndarray) -> Optional[float]:
    """Mean over groups of the mean recall of each grade present in that group's references.

    A missing prediction (``MISSING``) is simply a wrong grade. Groups are (category, field key) ids.
    """
    true, pred, group = np.asarray(true), np.asarray(pred), np.asarray(group)
    if true.size == 0:
        return None
    n_grades = int(true.max()) + 1
    key = group * n_grades + true  # one cell per (group, true grade)
    count = np.bincount(key)
    correct = np.bincount(key, weights=true == pred, minlength=count.size)
    cells = np.flatnonzero(count)
    recall = correct[cells] / count[cells]
    cell_group = cells // n_grades
    per_group = np.bincount(cell_group, weights=recall) / np.maximum(np.bincount(cell_group), 1)
    return float(per_group[np.unique(cell_group)].mean())


def farthest_grade(true: np.ndarray, num_grades: int) -> np.ndarray:
    """The grade in ``0..num_grades-1`` farthest from each true grade (how qwk scores a missing answer)."""
    true = np.asarray(true)
    return np.where(true * 2 < num_grades - 1, num_grades - 1, 0)


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_grades: int) -> np.ndarray:
    """``(num_grades, num_grades + 1)`` counts: rows true grade, columns predicted grade, last column missing."""
    true, pred = np.asarray(true), np.asarray(pred)
    col = np.where(pred == MISSING, num_grades, pred)
    return np.bincount(true * (num_grades + 1) + col,
                       minlength=num_grades * (num_grades + 1)).reshape(num_grades, num_grades + 1)


def qwk(true: np.ndarray, pred: np.ndarray, num_grades: int = 4) -> Optional[float]:
    """Quadratic-weighted Cohen's kappa over grades ``0..num_grades-1``.

    A ``MISSING`` prediction is scored as the grade farthest from the truth. None without pairs, and
    NaN-free: None also when kappa is undefined (every true and predicted grade the same single value).
    """
    true, pred = np.asarray(true), np.asarray(pred)
    if true.size == 0:
        return None
    pred = np.where(pred == MISSING, farthest_grade(true, num_grades), pred)
    observed = np.bincount(true * num_grades + pred, minlength=num_grades ** 2).reshape(num_grades, num_grades)
    observed = observed / true.size
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0))
    i, j = np.indices((num_grades, num_grades))
    weights = (i - j) ** 2 / (num_grades - 1) ** 2
    denom = float((weights * expected).sum())
    if denom == 0.0:
        return None
    return 1.0 - float((weights * observed).sum()) / denom


def miou(iou: np.ndarray) -> Optional[float]:
    """Mean IoU over references with a box (a missing box has IoU 0)."""
    iou = np.asarray(iou, dtype=np.float64)
    return float(iou.mean()) if iou.size else None


def acc_iou(iou: np.ndarray, threshold: float) -> Optional[float]:
    """Fraction of references with a box whose IoU is at least ``threshold``."""
    return _fraction(np.asarray(iou) >= threshold)


@dataclass
class ScoreArrays:
    """One model's answers aligned with the references, ready for ``summarize``.

    Pair arrays have one entry per (reference, field); reference arrays one entry per reference.
    """

    pair_ref: np.ndarray
    """(P,) index of the reference owning the pair"""
    pair_group: np.ndarray
    """(P,) (category, field key) group id"""
    pair_true: np.ndarray
    """(P,) reference grade"""
    pair_pred: np.ndarray
    """(P,) predicted grade or MISSING"""
    pair_ordinal: np.ndarray
    """(P,) bool: the field's range is 0-3 (enters qwk)"""
    has_box: np.ndarray
    """(N,) bool: the reference has a box"""
    iou: np.ndarray
    """(N,) IoU with the reference box (0 where the prediction has no box or the reference none)"""
    severity_found: np.ndarray
    """(N,) bool"""
    box_found: np.ndarray
    """(N,) bool"""
    box_pred: Optional[np.ndarray] = None
    """(N, 6) predicted boxes (zeros where ``box_found`` is False); only ``box_axis_errors`` reads them"""


def summarize(a: ScoreArrays, ref_mask: Optional[np.ndarray] = None) -> tuple[dict, dict]:
    """All ReasonKnee-Bench metrics over the references selected by ``ref_mask`` (all when None).

    Returns ``(values, support)``: ``values[metric]`` is a float or None (no data), and
    ``support[metric] = {"n": denominator, "parse_failures": unanswered items in it}``.
    """
    if ref_mask is None:
        ref_mask = np.ones(a.has_box.shape, dtype=bool)
    pm = ref_mask[a.pair_ref]
    ref, true, pred, group = a.pair_ref[pm], a.pair_true[pm], a.pair_pred[pm], a.pair_group[pm]
    ordinal = a.pair_ordinal[pm]
    boxed = ref_mask & a.has_box
    iou = a.iou[boxed]
    sev_fail = int((ref_mask & ~a.severity_found).sum())
    box_fail = int((boxed & ~a.box_found).sum())
    missing = int((pred == MISSING).sum())
    n_ref, n_box = int(ref_mask.sum()), int(boxed.sum())
    values = {
        "diag_exact": diag_exact(true, pred, ref),
        "diag_field": diag_field(true, pred),
        "balanced_acc": balanced_acc(true, pred, group),
        "qwk": qwk(true[ordinal], pred[ordinal]),
        "miou": miou(iou),
        "acc_iou25": acc_iou(iou, 0.25),
        "acc_iou50": acc_iou(iou, 0.5),
        "parse_fail_severity": sev_fail / n_ref if n_ref else None,
        "parse_fail_box": box_fail / n_box if n_box else None,
    }
    support = {
        "diag_exact": (n_ref, sev_fail),
        "diag_field": (int(pm.sum()), missing),
        "balanced_acc": (int(pm.sum()), missing),
        "qwk": (int(ordinal.sum()), int((pred[ordinal] == MISSING).sum())),
        "miou": (n_box, box_fail),
        "acc_iou25": (n_box, box_fail),
        "acc_iou50": (n_box, box_fail),
        "parse_fail_severity": (n_ref, sev_fail),
        "parse_fail_box": (n_box, box_fail),
    }
    return values, {k: {"n": n, "parse_failures": f} for k, (n, f) in support.items()}


# --- box errors per axis ---------------------------------------------------------------------------

BOX_AXIS_ERRORS = ("centre_abs_error", "centre_bias", "extent_bias", "tracking", "spread_ratio")
"""What ``box_axis_errors`` reports per array axis, in report order."""


def box_axis_errors(true: np.ndarray, pred: np.ndarray, groups: np.ndarray, axis_names: Sequence[str]) -> dict:
    """Where box errors come from, per array axis, over ``(N, 6)`` inclusive boxes ``[a0_min, a0_max, ...]``.

    IoU multiplies the three axes, so it cannot say which axis is off. Per axis (voxels, prediction minus
    reference): ``centre_abs_error`` and ``centre_bias`` (mean absolute and mean signed error of the box centre),
    ``extent_bias`` (mean signed error of the extent ``max - min + 1``). The other two ask whether the boxes follow
    each volume's anatomy rather than sit where that kind of box usually is: within each group (``groups``: one id
    per box, e.g. the question type, or question type and knee side), the centres' deviations from the group's mean
    are compared across volumes. ``tracking`` is the correlation of predicted and reference deviations pooled over
    groups (1: the boxes move with the anatomy; 0: they do not; None where either side never moves, as for a fixed
    box per group); ``spread_ratio`` is the predicted deviations' mean absolute value over the reference
    deviations' (near 0: one box per group whatever the volume; a mean rather than an RMS, so one stray box does
    not dominate). Returns ``{"n": N, axis name: {quantity: float or None}}``.
    """
    true, pred = np.asarray(true, dtype=np.float64).reshape(-1, 6), np.asarray(pred, dtype=np.float64).reshape(-1, 6)
    out: dict = {"n": int(len(true))}
    if len(true) == 0:
        return {**out, **{name: dict.fromkeys(BOX_AXIS_ERRORS) for name in axis_names}}
    _, q = np.unique(np.asarray(groups), return_inverse=True)
    count = np.bincount(q).astype(np.float64)

    def deviations(x: np.ndarray) -> np.ndarray:  # from the mean of the same group
        return x - (np.bincount(q, weights=x) / count)[q]

    for axis, name in enumerate(axis_names):
        lo, hi = 2 * axis, 2 * axis + 1
        c_true, c_pred = (true[:, lo] + true[:, hi]) / 2, (pred[:, lo] + pred[:, hi]) / 2
        d_true, d_pred = deviations(c_true), deviations(c_pred)
        ss_true, ss_pred = float(d_true @ d_true), float(d_pred @ d_pred)
        mad_true = float(np.abs(d_true).mean())
        out[name] = {
            "centre_abs_error": float(np.abs(c_pred - c_true).mean()),
            "centre_bias": float((c_pred - c_true).mean()),
            "extent_bias": float(((pred[:, hi] - pred[:, lo]) - (true[:, hi] - true[:, lo])).mean()),
            "tracking": float(d_true @ d_pred / np.sqrt(ss_true * ss_pred)) if ss_true > 0 and ss_pred > 0 else None,
            "spread_ratio": float(np.abs(d_pred).mean() / mad_true) if mad_true > 0 else None,
        }
    return out


# --- majority baseline ------------------------------------------------------------------------------

def majority_grades(field_ids: np.ndarray, grades: np.ndarray, num_fields: int) -> np.ndarray:
    """Most common grade per field id (ties: the smallest grade); ``MISSING`` for ids never seen.

    ``field_ids`` number the (question_id, field key) pairs of the schema.
    """
    field_ids, grades = np.asarray(field_ids), np.asarray(grades)
    out = np.full(num_fields, MISSING, dtype=np.int64)
    if field_ids.size == 0:
        return out
    n_grades = int(grades.max()) + 1
    counts = np.bincount(field_ids * n_grades + grades, minlength=num_fields * n_grades)
    counts = counts.reshape(num_fields, n_grades)  # (F, G)
    seen = counts.sum(axis=1) > 0
    out[seen] = counts[seen].argmax(axis=1)  # argmax takes the first maximum: the smallest grade
    return out


def majority_boxes(question_ids: np.ndarray, boxes: np.ndarray) -> dict[int, list[int]]:
    """Per question id, the per-coordinate median of its boxes, rounded down.

    ``boxes`` is ``(N, 6)`` for the references that have a box. Per-coordinate medians keep
    min <= max because every box does (order statistics of the mins never exceed those of the maxs).
    """
    question_ids, boxes = np.asarray(question_ids), np.asarray(boxes).reshape(-1, 6)
    out: dict[int, list[int]] = {}
    for q in np.unique(question_ids):
        med = np.floor(np.median(boxes[question_ids == q], axis=0)).astype(np.int64)
        out[int(q)] = med.tolist()
    return out
