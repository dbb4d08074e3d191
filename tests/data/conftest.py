"""Tiny release fixtures in the 3DReasonKnee layout, written by the tests themselves.

``make_release`` writes a few 8x12x10 volumes with masks, split CSVs, question files and items, either in
the synthetic style (items carry ``question_id`` and ``box``) or the public-release style (no id, no box,
wrapped and oddly spelled finding keys, a JSON block after the reasoning).
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pytest

from reasonknee3d.answer import format_answer
from reasonknee3d.boxes import box_from_mask
from reasonknee3d.schema import get_question

SHAPE = (8, 12, 10)  # loaded (S, H, W)
SPACING = (0.7, 0.365, 0.365)
# Question id -> label ids of its region; 42's label never occurs, so it has no box.
SUBREGIONS = {1: [1], 16: [1, 2], 30: [2], 42: [9]}
SEVERITY = {1: {"Size of BML (including cyst)": 2, "Number of BML within subregion": 1,
                "% of lesion that is BML (excluding cyst)": 3},
            16: {"Size of lesion": 1, "Depth of lesion": 0}, 30: {"grade": 2}, 42: {"grade": 1}}
COLUMNS = ["patient_id", "time", "study_folder", "series_folder", "knee_side", "path", "image_filepath",
           "label_filepath"]


def write_nifti(path: Path, arr: np.ndarray, spacing: Sequence[float] = SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag(list(spacing[:3]) + [1.0])
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def make_mask(seed: int) -> np.ndarray:
    """Labels 1 and 2 in two blocks whose position depends on ``seed`` (loaded orientation)."""
    m = np.zeros(SHAPE, dtype=np.uint8)
    o = seed % 2
    m[1 + o:4 + o, 2:6, 3:7] = 1
    m[4:7, 5 + o:10, 1:4 + o] = 2
    return m


def make_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(100, 20, SHAPE) + 200 * (make_mask(seed) > 0)).astype(np.int16)


@dataclass
class TinyRelease:
    root: Path
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    """volume id -> mask in loaded (S, H, W) orientation."""
    images: dict[str, Path] = field(default_factory=dict)
    """volume id -> absolute image path."""


def make_release(root: Path, n_volumes: int = 2, split: str = "test", real_style: bool = False,
                 slices_last: Sequence[int] = (), questions: Sequence[int] = (1, 30, 42)) -> TinyRelease:
    """Write a release whose volumes all belong to ``split`` (other splits are empty)."""
    rel = TinyRelease(root)
    rows, items = [], []
    for v in range(n_volumes):
        pid, time, study, series, side = f"90000{v:02d}", "00m", f"1.2.{v}", f"3.4.{v}", ("right", "left")[v % 2]
        image_rel = f"images/{pid}/{time}/{study}_{series}_{side}.nii.gz"
        mask_rel = f"masks/knee_{v:03d}.nii.gz"
        image, mask = make_image(v), make_mask(v)
        spacing = SPACING
        if v in slices_last:
            # Stored (H, W, S): loaded = stored.transpose(2, 0, 1)
            image, mask, spacing = image.transpose(1, 2, 0), mask.transpose(1, 2, 0), SPACING[1:] + SPACING[:1]
        write_nifti(root / image_rel, image, spacing)
        write_nifti(root / mask_rel, mask, spacing)
        vid = Path(image_rel).name.removesuffix(".nii.gz")
        rel.masks[vid], rel.images[vid] = make_mask(v), (root / image_rel).resolve()
        rows.append([pid, time, study, series, side, f"{pid}/{time}/{study}/{series}", image_rel, mask_rel])
        for q in questions:
            items.append(make_item(image_rel, q, make_mask(v), real_style))

    (root / "data" / "split_files").mkdir(parents=True)
    for s in ("train", "val", "test"):
        with open(root / "data" / "split_files" / f"{s}_split.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            if s == split.split("_")[0]:
                w.writerows(rows)
    gen = root / "data" / "generate_data"
    gen.mkdir(parents=True)
    for s in ("train", "val", "test", "test_balanced"):
        (gen / f"{s}.json").write_text(json.dumps(items if s == split else []))
    qf = root / "data" / "question_files"
    qf.mkdir(parents=True)
    (qf / "question_subregion_mapping.json").write_text(json.dumps({str(k): v for k, v in SUBREGIONS.items()}))
    (qf / "questions.json").write_text(json.dumps({str(q): f"Question {q}?" for q in SUBREGIONS}))
    return rel


def make_item(image_rel: str, qid: int, mask: np.ndarray, real_style: bool) -> dict:
    spec = get_question(qid)
    sev = SEVERITY[qid]
    box = box_from_mask(mask, SUBREGIONS[qid])
    reasoning = [f"Step one for question {qid}.", "Step two."]
    if not real_style:
        return {"image": image_rel, "prompt": f"Question {qid}?", "question_id": qid, "box": box,
                "answer": format_answer(spec, reasoning, box, sev), "final_diagnosis": {spec.finding_key: sev}}
    # Public-release style: wrapper, spaced/cased key variants, string grades, trailing JSON block.
    key = spec.finding_key.upper().replace(" ", "_")
    fields = {k.lower(): str(g) for k, g in sev.items()}
    answer = "\n".join(reasoning) + "\n" + json.dumps({"MOAKS_scores": {spec.finding_key: sev}}, indent=1)
    return {"image": image_rel, "prompt": f"Question {qid}?", "answer": answer,
            "final_diagnosis": {"MOAKS_scores": {key: fields}}}


@pytest.fixture
def release(tmp_path: Path) -> TinyRelease:
    return make_release(tmp_path / "rel")


@pytest.fixture
def release_factory(tmp_path: Path):
    """``release_factory(**make_release kwargs)`` -> a new ``TinyRelease`` in its own folder."""
    count = iter(range(1000))
    return lambda **kw: make_release(tmp_path / f"rel{next(count)}", **kw)


@pytest.fixture
def nifti_writer(tmp_path: Path):
    """``nifti_writer(name, array, spacing=SPACING)`` -> path of a NIfTI written under tmp_path."""
    return lambda name, arr, spacing=SPACING: write_nifti(tmp_path / name, arr, spacing)


@pytest.fixture
def tiny():
    """This module (constants and writers: ``tiny.SHAPE``, ``tiny.make_mask``...), since tests cannot
    import a conftest under ``--import-mode=importlib``."""
    return sys.modules[__name__]
