"""Release loader: normalized samples, question ids and boxes for public-style items, references, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from reasonknee3d import cli
from reasonknee3d.boxes import box_from_mask
from reasonknee3d.data import release as release_mod
from reasonknee3d.data.release import ReleaseError, ReleaseLoader, export_references, iter_samples
from reasonknee3d.schema import get_question


def test_synthetic_style_samples(release, tiny):
    samples = list(iter_samples(release.root, "test"))
    assert len(samples) == 2 * 3
    s = samples[0]
    vid = next(iter(release.masks))
    assert (s.sample_id, s.volume_id, s.question_id, s.split) == (f"{vid}:q1", vid, 1, "test")
    assert s.image_path == release.images[vid] and s.image_path.is_absolute()
    assert s.mask_path is not None and s.mask_path.name == "knee_000.nii.gz"
    assert s.severity == tiny.SEVERITY[1] and s.knee_side == "right" and s.patient_id == "9000000"
    assert s.box == box_from_mask(release.masks[vid], [1])
    # The synthetic answer is already normalized: rebuilding it changes nothing.
    item = json.loads((release.root / "data/generate_data/test.json").read_text())[0]
    assert s.answer == item["answer"]
    # Question 42's region is absent from the mask: no box, no Location line.
    q42 = [x for x in samples if x.question_id == 42]
    assert all(x.box is None and "Location:" not in x.answer for x in q42)


def test_public_style_items_get_question_id_box_and_normalized_answer(release_factory, tiny):
    rel = release_factory(real_style=True, slices_last=(1,))
    samples = list(iter_samples(rel.root, "test"))
    assert [s.question_id for s in samples] == [1, 30, 42] * 2
    for s in samples:
        assert s.severity == tiny.SEVERITY[s.question_id]  # string grades, spelling variants normalized
        assert s.box == box_from_mask(rel.masks[s.volume_id], tiny.SUBREGIONS[s.question_id])
        lines = s.answer.splitlines()
        # Rebuilt in the package's order: the first step, the box, the other steps, the diagnosis.
        assert (s.box is not None) == lines[1].startswith("Location: <|box_start|>[")
        steps = [line for line in lines[:-1] if not line.startswith("Location:")]
        assert steps == [f"Step one for question {s.question_id}.", "Step two."]
        spec = get_question(s.question_id)
        assert lines[-1] == "Final diagnosis: " + json.dumps({spec.finding_key: tiny.SEVERITY[s.question_id]})


def test_mask_is_read_once_per_volume(release_factory, monkeypatch):
    rel = release_factory(real_style=True, n_volumes=2)
    calls = []
    real = release_mod.load_mask
    monkeypatch.setattr(release_mod, "load_mask", lambda p, meta: calls.append(p) or real(p, meta))
    assert len(list(iter_samples(rel.root, "test"))) == 6
    assert len(calls) == 2


def test_unknown_question_id_names_file_and_item(release):
    path = release.root / "data/generate_data/test.json"
    items = json.loads(path.read_text())
    items[1]["question_id"] = 99
    path.write_text(json.dumps(items))
    with pytest.raises(ReleaseError, match=r"test\.json item 1 .*unknown question id 99"):
        list(iter_samples(release.root, "test"))


def test_unmatched_finding_key(release_factory):
    rel = release_factory(real_style=True, n_volumes=1)
    path = rel.root / "data/generate_data/test.json"
    items = json.loads(path.read_text())
    items[0]["final_diagnosis"] = {"MOAKS_scores": {"elbow BML": {"x": 1}}}
    path.write_text(json.dumps(items))
    with pytest.raises(ReleaseError, match=r"item 0 .*cannot tell the question.*\['elbow BML'\]"):
        list(iter_samples(rel.root, "test"))


def test_out_of_range_grade(release):
    path = release.root / "data/generate_data/test.json"
    items = json.loads(path.read_text())
    items[1]["final_diagnosis"] = {"patella superior osteophyte": {"grade": 7}}
    path.write_text(json.dumps(items))
    with pytest.raises(ReleaseError, match=r"item 1 .*'grade' of question 30 has grade 7"):
        list(iter_samples(release.root, "test"))


def test_missing_image_file_names_it(release):
    vid, img = next(iter(release.images.items()))
    img.unlink()
    with pytest.raises(ReleaseError, match=rf"item 0.*{vid}\.nii\.gz: file not found"):
        list(iter_samples(release.root, "test"))


def test_mask_shape_mismatch_names_both(release_factory, tiny, monkeypatch):
    rel = release_factory(real_style=True, n_volumes=1)
    tiny.write_nifti(rel.root / "masks/knee_000.nii.gz", np.zeros((8, 12, 9), np.uint8))
    with pytest.raises(ReleaseError, match=r"knee_000\.nii\.gz: mask shape \(8, 12, 9\) differs from its volume"):
        list(iter_samples(rel.root, "test"))
    # In batch mode every item of the volume is skipped, and the bad mask is still read only once.
    calls = []
    real = release_mod.load_mask
    monkeypatch.setattr(release_mod, "load_mask", lambda p, meta: calls.append(p) or real(p, meta))
    skipped = []
    assert list(iter_samples(rel.root, "test", skipped)) == []
    assert len(skipped) == 3 and len(calls) == 1
    assert all("mask shape (8, 12, 9) differs" in s.reason for s in skipped)


def test_box_outside_volume_rejected(release):
    path = release.root / "data/generate_data/test.json"
    items = json.loads(path.read_text())
    items[0]["box"] = [0, 1, 0, 1, 0, 99]
    path.write_text(json.dumps(items))
    with pytest.raises(ReleaseError, match=r"item 0 .*does not fit a volume of shape \(8, 12, 10\)"):
        list(iter_samples(release.root, "test"))


def test_test_balanced_uses_test_csv(release_factory):
    rel = release_factory(split="test_balanced", n_volumes=1)
    assert {s.split for s in iter_samples(rel.root, "test_balanced")} == {"test_balanced"}
    assert list(iter_samples(rel.root, "test")) == []


def test_missing_csv_column(release):
    path = release.root / "data/split_files/test_split.csv"
    path.write_text(path.read_text().replace("label_filepath", "labels"))
    with pytest.raises(ReleaseError, match=r"test_split\.csv: missing columns \['label_filepath'\]"):
        ReleaseLoader(release.root).volumes("test")


def test_export_references_rows(release, tmp_path):
    out = tmp_path / "refs" / "R.jsonl"
    result = export_references(release.root, "test", out)
    assert result.ok and result.n_done == 6 and result.skipped_path is None
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(rows[0]) == {"sample_id", "volume_id", "question_id", "severity", "box", "split"}
    samples = list(iter_samples(release.root, "test"))
    assert rows == [{"sample_id": s.sample_id, "volume_id": s.volume_id, "question_id": s.question_id,
                     "severity": s.severity, "box": s.box, "split": "test"} for s in samples]


def test_export_references_cli_skips_bad_items_and_exits_nonzero(release, tmp_path):
    path = release.root / "data/generate_data/test.json"
    items = json.loads(path.read_text())
    items[4]["question_id"] = 123
    path.write_text(json.dumps(items))
    next(iter(release.images.values())).unlink()  # volume 0: its 3 items are skipped
    out = tmp_path / "R.jsonl"
    assert cli.main(["export-references", "--data", str(release.root), "--split", "test", "--out", str(out)]) == 1
    assert len(out.read_text().splitlines()) == 2
    skipped = [json.loads(line) for line in (tmp_path / "R.skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 4
    assert sum("file not found" in s["reason"] for s in skipped) == 3
    assert any("item 4" in s["item"] and "unknown question id 123" in s["reason"] for s in skipped)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["R.jsonl", "R.skipped.jsonl"]


def test_label_boxes_union_equals_box_from_mask():
    rng = np.random.default_rng(0)
    mask = np.zeros((9, 11, 13), np.uint8)
    for label in range(1, 9):
        lo = rng.integers(0, 6, size=3)
        mask[lo[0]:lo[0] + 3, lo[1]:lo[1] + 4, lo[2]:lo[2] + 5] = label
    boxes = release_mod._label_boxes(mask)
    for labels in ([1], [2, 5], [3, 4, 8], [7, 40], [40]):
        got = release_mod._union_box([boxes[k] for k in labels if k in boxes])
        assert got == box_from_mask(mask, labels)


def test_normalized_finding_keys_are_unique():
    assert len(release_mod._specs_by_finding_key()) == 69


def test_export_failure_leaves_no_partial_file(release, tmp_path):
    (release.root / "data/generate_data/test.json").write_text("[{\"image\": ")  # truncated JSON
    with pytest.raises(ReleaseError, match=r"test\.json: invalid JSON"):
        export_references(release.root, "test", tmp_path / "R.jsonl")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".R", "R"))]


def test_reasoning_lines_skip_a_location_line_wherever_it_stands():
    from reasonknee3d.data.release import _reasoning_lines
    box = "<|box_start|>[1, 2, 3, 4, 5, 6]<|box_end|>"
    ours = f"Location: {box}\nStep one.\nStep two.\nFinal diagnosis: {{}}"
    theirs = f"Step one.\nLocation: {box}\n\nStep two.\n```json\n{{}}\n```\nStep after the JSON."
    assert _reasoning_lines(ours) == _reasoning_lines(theirs) == ["Step one.", "Step two."]
