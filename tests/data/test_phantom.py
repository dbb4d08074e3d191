"""Knee phantoms: labels, lesions inside their regions, grades visible in the image, mirroring, resolution."""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Optional

import numpy as np
import pytest

from reasonknee3d.boxes import box_from_mask
from reasonknee3d.data.phantom import (FOV_MM, Phantom, label_names, question_labels, render_phantom,
                                       sample_anatomy, volume_affine)
from reasonknee3d.schema import get_question, load_schema

SMALL = (24, 48, 48)


def _render(severities: Mapping[int, Mapping[str, int]], shape=SMALL, seed: int = 0, side: Optional[str] = "right",
            straight: bool = False) -> Phantom:
    anatomy = sample_anatomy(np.random.default_rng(seed), side=side)
    if straight:
        anatomy = replace(anatomy, rotation_deg=(0.0, 0.0, 0.0), shift_mm=(0.0, 0.0, 0.0), scale=(1.0, 1.0, 1.0))
    return render_phantom(shape, anatomy, severities, np.random.default_rng(seed + 1000))


def _all_at(grade: int) -> dict[int, dict[str, int]]:
    """Every question at ``grade`` (capped by each field's range; cyst tear location follows presence)."""
    out = {}
    for qid, spec in load_schema().items():
        out[qid] = {f.key: min(grade, f.max_grade) for f in spec.fields}
    return out


def _lesion_count(q: int, sev: dict[str, int], **kw) -> int:
    return len(_render({q: sev}, **kw).lesions.get(q, []))


def test_labels_fit_an_nnunet_mask_and_cover_every_question() -> None:
    names = label_names()
    assert list(names) == list(range(1, len(names) + 1)) and len(names) <= 64
    assert len(set(names.values())) == len(names)
    for qid in load_schema():
        assert question_labels(qid) and set(question_labels(qid)) <= set(names)
    assert [names[i] for i in question_labels(56)] == [
        "medial meniscus anterior horn", "medial meniscus body", "medial meniscus posterior horn"]


@pytest.mark.parametrize("shape", [(16, 32, 32), SMALL, (32, 96, 96)])
def test_every_label_exists_for_random_knees(shape) -> None:
    for seed in range(4):
        labels = _render(_all_at(seed % 4), shape=shape, seed=seed, side=None).labels
        counts = np.bincount(labels.ravel(), minlength=len(label_names()) + 1)
        assert np.all(counts[1:] > 0), [label_names()[i] for i in np.flatnonzero(counts[1:] == 0) + 1]


def test_lesions_stay_inside_their_region_and_its_box() -> None:
    ph = _render(_all_at(3), seed=1)
    flat_labels = ph.labels.ravel()
    for qid, idx in ph.lesions.items():
        assert np.isin(flat_labels[idx], question_labels(qid)).all(), qid
        box = ph.question_box(qid)
        assert box == box_from_mask(ph.labels, question_labels(qid))
        coords = np.stack(np.unravel_index(idx, ph.labels.shape), axis=1)
        assert np.all(coords.min(0) >= box[0::2]) and np.all(coords.max(0) <= box[1::2]), qid


def test_abnormal_grades_draw_lesions_and_normal_knees_have_none() -> None:
    # Extrusion and hypertrophy change the shape of the meniscus instead of drawing lesion tissue.
    shaped = {q for q, s in load_schema().items() if s.category in ("meniscal_extrusion", "meniscal_hypertrophy")}
    assert set(_render(_all_at(1), seed=2).lesions) == set(load_schema()) - shaped
    assert _render(_all_at(0), seed=2).lesions == {}


def test_bml_size_and_cyst_share_are_visible() -> None:
    q = 4  # femur medial central BML
    keys = get_question(q).field_keys
    counts = [_lesion_count(q, {keys[0]: s, keys[1]: 1, keys[2]: 3}) for s in (1, 2, 3)]
    assert counts[0] < counts[1] < counts[2]
    # A lower "% BML" grade means more cyst, which is brighter than edema.
    means = []
    for pct in (1, 2, 3):
        ph = _render({q: {keys[0]: 3, keys[1]: 1, keys[2]: pct}})
        means.append(ph.image.ravel()[ph.lesions[q]].mean())
    assert means[0] > means[1] > means[2]
    ph = _render({q: {keys[0]: 2, keys[1]: 2, keys[2]: 3}}, shape=(32, 96, 96))
    region = np.isin(ph.labels.ravel(), question_labels(q))
    lesion = np.zeros_like(region)
    lesion[ph.lesions[q]] = True
    assert ph.image.ravel()[lesion].mean() > 1.5 * ph.image.ravel()[region & ~lesion].mean()


def test_cartilage_size_and_depth_are_visible() -> None:
    q = 19  # femur medial central cartilage
    size = [_lesion_count(q, {"Size of lesion": s, "Depth of lesion": 3}, shape=(32, 96, 96)) for s in (1, 2, 3)]
    assert size[0] < size[1] < size[2]
    depth = [_lesion_count(q, {"Size of lesion": 3, "Depth of lesion": d}, shape=(32, 96, 96)) for d in (1, 2, 3)]
    assert depth[0] < depth[1] < depth[2]


@pytest.mark.parametrize("q", [30, 35, 41])
def test_osteophytes_grow_with_grade(q: int) -> None:
    counts = [_lesion_count(q, {"grade": g}, shape=(32, 96, 96)) for g in (1, 2, 3)]
    assert counts[0] < counts[1] < counts[2]


def test_effusion_and_hoffa_synovitis_grow_with_grade() -> None:
    fluid = question_labels(43)[0]
    volumes = [int(np.sum(_render({43: {"grade": g}}).labels == fluid)) for g in range(4)]
    assert volumes == sorted(volumes) and len(set(volumes)) == 4
    hoffa = [_lesion_count(42, {"grade": g}) for g in (1, 2, 3)]
    assert hoffa[0] < hoffa[1] < hoffa[2]


def test_meniscal_extrusion_moves_the_meniscus_out_and_hypertrophy_enlarges_it() -> None:
    kw = dict(shape=(48, 96, 96), straight=True)
    body, horn = question_labels(45), question_labels(44)
    # Right knee: medial is towards higher axis-0 indices; anterior is towards lower axis-2 indices.
    medial_edge = [_render({45: {"grade": g}}, **kw).question_box(45)[1] for g in range(4)]
    assert medial_edge == sorted(medial_edge) and medial_edge[3] > medial_edge[0]
    front_edge = [_render({44: {"grade": g}}, **kw).question_box(44)[4] for g in range(4)]
    assert front_edge == sorted(front_edge, reverse=True) and front_edge[3] < front_edge[0]
    sizes = [int(np.isin(_render({56: {"presence": p}}, **kw).labels, question_labels(56)).sum()) for p in (0, 1)]
    assert sizes[1] > 1.3 * sizes[0]
    assert body != horn


def test_meniscal_morphology_codes_draw_distinct_patterns() -> None:
    drawn = {code: _render({49: {"morphology": code}}, shape=(32, 96, 96)).lesions[49] for code in range(1, 9)}
    patterns = {tuple(v.tolist()) for v in drawn.values()}
    assert len(patterns) == 8
    assert len(drawn[6]) < len(drawn[7]) < len(drawn[8])  # maceration removes more and more tissue


def test_left_knee_mirrors_the_medial_lateral_axis() -> None:
    for side, medial_higher in (("right", True), ("left", False)):
        ph = _render({}, side=side, straight=True)
        medial, lateral = ph.question_box(49), ph.question_box(52)
        assert (medial[0] > lateral[1]) == medial_higher and (lateral[0] > medial[1]) != medial_higher


def test_the_same_knee_renders_the_same_anatomy_at_any_resolution() -> None:
    small = _render({}, shape=(32, 64, 64), straight=True)
    large = _render({}, shape=(64, 128, 128), straight=True)
    for q in (4, 10, 19, 43, 49, 60, 62):
        a = np.asarray(small.question_box(q)) / np.repeat((32, 64, 64), 2)
        b = np.asarray(large.question_box(q)) / np.repeat((64, 128, 128), 2)
        assert np.allclose(a, b, atol=0.06), (q, a, b)


def test_rendering_is_deterministic_and_images_look_like_dess() -> None:
    a, b = _render(_all_at(2), seed=5), _render(_all_at(2), seed=5)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.lesions.keys() == b.lesions.keys() and all(np.array_equal(a.lesions[q], b.lesions[q]) for q in a.lesions)
    ph = _render({}, shape=(32, 96, 96))
    assert ph.image.dtype == np.int16 and ph.labels.dtype == np.uint8 and ph.image.shape == (32, 96, 96)
    names = {n: i for i, n in label_names().items()}

    def mean(name: str) -> float:
        return float(ph.image[ph.labels == names[name]].mean())
    assert mean("joint fluid") > mean("femur medial central cartilage") > mean("femur medial central bone")
    assert mean("femur medial central bone") > mean("medial meniscus body")
    assert ph.image[ph.labels == names["femur"]].std() > 0  # noise


def test_affine_spacing_follows_the_field_of_view() -> None:
    aff = volume_affine((160, 384, 384), "right")
    assert np.allclose(np.linalg.norm(aff[:3, :3], axis=0), np.asarray(FOV_MM) / (160, 384, 384))
    assert np.allclose(np.linalg.norm(aff[:3, :3], axis=0), [0.7, 0.3645833, 0.3645833])


def test_bad_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"phantom shape \(4, 48, 48\)"):
        _render({}, shape=(4, 48, 48))
