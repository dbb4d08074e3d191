"""predict with a canonical-side model: boxes of mirrored (left) knees come back in the stored volume's voxels."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from reasonknee3d.data.release import ReleaseError
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.evaluation.infer import infer
from reasonknee3d.evaluation.predict import predict
from reasonknee3d.families.threed import ReasonKnee3DFamily

SHAPE = (16, 32, 32)
BOX = "<|box_start|>[1, 4, 5, 9, 10, 12]<|box_end|>"


def test_generated_boxes_of_mirrored_knees_are_mirrored_back(tmp_path: Path, monkeypatch, tiny_3d_model_dir) -> None:
    release = tmp_path / "release"
    write_synthetic_release(release, n_volumes=6, shape=SHAPE, seed=0, questions=[1])
    model_dir = tiny_3d_model_dir(tmp_path / "model", {"input_shape": list(SHAPE), "canonical_side": "right"})
    # Whatever the tiny model generates, decode returns one fixed box (in the frame the model saw).
    monkeypatch.setattr(ReasonKnee3DFamily, "decode",
                        lambda self, m, p, generated, shapes: [f"Location: {BOX}"] * len(shapes))
    out = tmp_path / "p.jsonl"
    predict(model_dir, release, "train", out, batch_size=4, max_new_tokens=4, constrained=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sides = {r["sample_id"]: r["sample_id"].split(":")[0].rsplit("_", 1)[1] for r in rows}
    assert set(sides.values()) == {"left", "right"}, "the train split should hold both knee sides"
    for r in rows:
        expect = BOX if sides[r["sample_id"]] == "right" else "<|box_start|>[11, 14, 5, 9, 10, 12]<|box_end|>"
        assert r["output"] == f"Location: {expect}"
    # infer does the same for one volume; a file name without the side needs knee_side.
    left = next(p for p in release.rglob("*_left.nii.gz"))
    assert infer(model_dir, left, 1, constrained=False, max_new_tokens=4).box == [11, 14, 5, 9, 10, 12]
    anonymous = shutil.copy(left, tmp_path / "knee.nii.gz")
    with pytest.raises(ReleaseError, match="knee side"):
        infer(model_dir, anonymous, 1, constrained=False, max_new_tokens=4)
    assert infer(model_dir, anonymous, 1, constrained=False, max_new_tokens=4, knee_side="right").box == \
        [1, 4, 5, 9, 10, 12]
