"""Phantom lesions measured on the rendered volume fall inside the MOAKS interval of the grade they were drawn at."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from reasonknee3d import moaks
from reasonknee3d.data.phantom import (FOV_MM, _Canvas, _draw_cartilage, _Vox, label_names, question_labels,
                                       render_phantom, sample_anatomy)
from reasonknee3d.schema import get_question

_IDS = {n: i for i, n in label_names().items()}


def _anatomy(seed: int = 0, scale: float = 1.0, straight: bool = False):
    a = sample_anatomy(np.random.default_rng(seed), side="right")
    if straight:
        a = replace(a, rotation_deg=(0.0, 0.0, 0.0), shift_mm=(0.0, 0.0, 0.0), scale=(scale,) * 3)
    return a


@pytest.mark.parametrize("q,size", [(4, 1), (4, 2), (4, 3), (11, 2), (1, 3)])
def test_bml_takes_the_share_of_its_subregion_its_size_grade_states(q: int, size: int) -> None:
    spec = get_question(q)
    keys = spec.field_keys
    sev = {keys[0]: size, keys[1]: 1, keys[2]: 3}
    ph = render_phantom((24, 48, 48), _anatomy(q), {q: sev}, np.random.default_rng(q))
    region = int(np.isin(ph.labels, question_labels(q)).sum())
    measured = len(ph.lesions[q]) / region
    assert moaks.grade_meaning(spec, keys[0], size).contains(measured), (measured, region)
    for other in (1, 2, 3):
        if other != size:
            assert not moaks.grade_meaning(spec, keys[0], other).contains(measured)


def _slab_defect(size: int, depth: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A flat cartilage slab (4 voxels thick, axis 1 = depth) with one drawn defect: (lost mask, slab mask)."""
    shape = (64, 8, 64)
    anatomy = replace(_anatomy(straight=True), scale=(1.0, 1.0, 1.0))
    cv = _Canvas(shape, anatomy, {}, np.random.default_rng(seed))
    g = cv.block((slice(0, 64), slice(2, 6), slice(0, 64)))
    nz = tuple(a.ravel() for a in np.meshgrid(np.arange(64), np.arange(4), np.arange(64), indexing="ij"))
    v = _Vox(g, nz)
    depth_map = 1.0 - (nz[1] + 0.5) / 4.0  # row 2 is the joint surface (near 1), row 5 lies on bone
    _draw_cartilage(cv, 16, {"Size of lesion": size, "Depth of lesion": depth}, v, depth_map)
    lost = np.zeros(shape, bool)
    if 16 in cv.lesions:
        lost.ravel()[np.concatenate(cv.lesions[16])] = True
    slab = np.zeros(shape, bool)
    slab[:, 2:6, :] = True
    return lost[:, 2:6, :], slab[:, 2:6, :]


@pytest.mark.parametrize("size,depth", [(1, 0), (2, 0), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3)])
def test_cartilage_defect_area_and_full_thickness_share_match_their_grades(size: int, depth: int) -> None:
    spec = get_question(16)
    lost, slab = _slab_defect(size, depth)
    footprint = lost.any(axis=1)  # surface positions (axis 0, axis 2) with any loss
    full = lost.all(axis=1)  # ... with loss down to bone
    area = footprint.sum() / slab.any(axis=1).sum()
    share = full.sum() / footprint.sum()
    assert moaks.grade_meaning(spec, "Size of lesion", size).contains(area), area
    assert moaks.grade_meaning(spec, "Depth of lesion", depth).contains(share), share
    if depth == 0:  # partial thickness: the deepest layer stays
        assert not lost[:, -1, :].any()


@pytest.mark.parametrize("scale", [0.9, 1.1])
@pytest.mark.parametrize("grade", [0, 1, 2, 3])
def test_meniscal_extrusion_in_mm_from_the_volume_spacing(grade: int, scale: float) -> None:
    q = 45  # medial meniscus medial extrusion: the body beyond the medial tibial margin, along axis 0
    shape = (224, 48, 48)
    ph = render_phantom(shape, _anatomy(scale=scale, straight=True), {q: {"grade": grade}}, np.random.default_rng(0))
    spacing = float(np.linalg.norm(ph.affine[:3, 0]))
    assert spacing == pytest.approx(FOV_MM[0] / shape[0])
    meniscus = np.nonzero(np.isin(ph.labels, question_labels(q)))[0].max()
    tibia = np.nonzero(np.isin(ph.labels, [_IDS[f"tibia medial {p} bone"]
                                           for p in ("anterior", "central", "posterior")]))[0].max()
    extrusion_mm = (meniscus - tibia) * spacing
    assert moaks.grade_meaning(get_question(q), "grade", grade).contains(max(extrusion_mm, 0.0)), extrusion_mm


@pytest.mark.parametrize("tear", [0, 1, 2])
def test_meniscal_cyst_sits_beside_the_torn_segment(tear: int) -> None:
    q = 54
    ph = render_phantom((32, 96, 96), _anatomy(straight=True), {q: {"presence": 1, "tear_location": tear}},
                        np.random.default_rng(0))
    cyst_y = np.unravel_index(ph.lesions[q], ph.labels.shape)[2].mean()
    parts = [np.nonzero(np.isin(ph.labels, _IDS[f"medial meniscus {p}"]))[2].mean()
             for p in ("anterior horn", "body", "posterior horn")]
    assert int(np.argmin([abs(cyst_y - p) for p in parts])) == tear


def test_drawing_is_deterministic_per_seed() -> None:
    a, _ = _slab_defect(2, 2, seed=3)
    b, _ = _slab_defect(2, 2, seed=3)
    c, _ = _slab_defect(2, 2, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
