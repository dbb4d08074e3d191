"""data.recentre end to end: the setting is saved with the model, and predict / infer / the processor write the
boxes the model produced in its moved frame back in the stored volume's voxels."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from reasonknee3d.boxes import box_to_text, clip_boxes, mirror_boxes
from reasonknee3d.config import ConfigError
from reasonknee3d.data.frame import VolumeFrame
from reasonknee3d.data.release import iter_samples
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.data.transforms import preprocess_volume_frame
from reasonknee3d.evaluation.infer import infer
from reasonknee3d.evaluation.predict import predict, stored_frame_text
from reasonknee3d.families import load_experiment_config
from reasonknee3d.families.registry import SampleInfo
from reasonknee3d.families.threed import ReasonKnee3DFamily

SHAPE = (16, 32, 32)
MODEL_BOX = [6, 9, 12, 18, 10, 14]
BOX = box_to_text(MODEL_BOX)


def _stored_by_hand(box, frame: VolumeFrame) -> list[int]:
    """A model-frame box back in stored voxels, by hand (no resize here): move back, clip, mirror."""
    b = clip_boxes(np.asarray(box) - np.repeat(frame.offset, 2), frame.stored_shape)
    return [int(v) for v in (mirror_boxes(b, frame.stored_shape) if frame.mirrored else b)]


@pytest.fixture(scope="module")
def recentred(tmp_path_factory, tiny_3d_model_dir):
    tmp = tmp_path_factory.mktemp("recentre")
    release = tmp / "release"
    write_synthetic_release(release, n_volumes=6, shape=SHAPE, seed=0, questions=[1])
    return release, tiny_3d_model_dir(tmp / "model", {"input_shape": list(SHAPE), "canonical_side": "right",
                                                           "recentre": "centroid"})


def test_predict_and_infer_write_boxes_back_in_stored_voxels(recentred, tmp_path, monkeypatch):
    release, model_dir = recentred
    saved = [json.loads(p.read_text()) for p in model_dir.glob("*.json")]
    assert any(d.get("preprocess", {}).get("recentre") == "centroid" for d in saved if isinstance(d, dict))
    # Whatever the tiny model generates, decode returns one fixed box (in the frame the model saw).
    monkeypatch.setattr(ReasonKnee3DFamily, "decode",
                        lambda self, m, p, generated, shapes: [f"Location: {BOX}"] * len(shapes))
    out = tmp_path / "p.jsonl"
    predict(model_dir, release, "train", out, batch_size=4, max_new_tokens=4, constrained=False)
    rows = {json.loads(line)["sample_id"]: json.loads(line)["output"] for line in out.read_text().splitlines()}
    from reasonknee3d.models.reasonknee3d.processing_reasonknee3d import ReasonKnee3DProcessor
    cfg = ReasonKnee3DProcessor.from_pretrained(model_dir).preprocess_config()
    assert cfg.recentre == "centroid"
    moved = 0
    for s in iter_samples(release, "train"):
        frame = preprocess_volume_frame(s.image_path, cfg, s.knee_side)[1]
        expected = _stored_by_hand(MODEL_BOX, frame)
        assert rows[s.sample_id] == f"Location: {box_to_text(expected)}"
        moved += any(frame.offset)
    assert moved > 0, "the synthetic knees should sit off centre"
    # infer (and answer_question, which calls it) does the same for one volume
    s = next(s for s in iter_samples(release, "train") if s.knee_side == "left")
    frame = preprocess_volume_frame(s.image_path, cfg)[1]
    assert infer(model_dir, s.image_path, 1, constrained=False, max_new_tokens=4).box == \
        _stored_by_hand(MODEL_BOX, frame)


def test_write_back_returns_the_stored_reference_box(recentred):
    release, model_dir = recentred
    from reasonknee3d.models.reasonknee3d.processing_reasonknee3d import ReasonKnee3DProcessor
    processor = ReasonKnee3DProcessor.from_pretrained(model_dir)
    checked = 0
    for s in iter_samples(release, "train"):
        if s.box is None:
            continue
        frame = processor.frame(s.image_path)
        assert frame == preprocess_volume_frame(s.image_path, processor.preprocess_config())[1]
        model_text = frame.text_to_model(s.answer)
        info = SampleInfo(s.sample_id, s.question_id, frame.stored_shape, True, frame)
        if any(frame.offset) or frame.mirrored:
            assert model_text != s.answer
        # a model-frame answer through predict's write-back gives the stored reference box
        assert stored_frame_text(model_text, info) == s.answer
        assert re.search(re.escape(box_to_text(s.box)), stored_frame_text(model_text, info))
        checked += 1
    assert checked > 0
    # without a frame the text is written as generated
    assert stored_frame_text(BOX, SampleInfo("x", 1, SHAPE, True)) == BOX


def test_processor_batch_decode_moves_boxes_back_with_frames(recentred):
    from reasonknee3d.boxes import box_to_coord_tokens
    from reasonknee3d.models.reasonknee3d.processing_reasonknee3d import ReasonKnee3DProcessor
    release, model_dir = recentred
    processor = ReasonKnee3DProcessor.from_pretrained(model_dir)
    path = next(s.image_path for s in iter_samples(release, "train") if s.knee_side == "left")
    frame = processor.frame(path)
    assert frame.mirrored and processor.mirrors(path) and processor.frame(np.zeros(SHAPE)) is None
    # the processor's own preprocess path moves the volume as the cache does
    loaded, shape = processor.load_volume(path)
    np.testing.assert_array_equal(loaded[0].numpy(), preprocess_volume_frame(path, processor.preprocess_config())[0])
    ids = processor.tokenizer(box_to_coord_tokens(MODEL_BOX, SHAPE, 32), add_special_tokens=False).input_ids
    texts = processor.batch_decode([ids, ids], orig_shapes=[shape] * 2, frames=[frame, None])
    assert texts == [box_to_text(_stored_by_hand(MODEL_BOX, frame)), BOX]
    with pytest.raises(ValueError, match="mirrored or frames"):
        processor.batch_decode([ids], orig_shapes=[shape], mirrored=[True], frames=[frame])


def test_experiment_configs_accept_recentre_and_the_slice_family_rejects_it():
    exp = load_experiment_config("tiny_3d", ["data.recentre=centroid"])
    assert exp.data.recentre == "centroid"
    assert load_experiment_config("tiny_3d").data.recentre is None
    with pytest.raises(ConfigError, match=r"data\.recentre: the slice baseline reads volumes as stored"):
        load_experiment_config("tiny_slice", ["data.recentre=centroid"])
    with pytest.raises(ConfigError, match=r"recentre must be one of \('centroid',\)"):
        load_experiment_config("tiny_3d", ["data.recentre=mean"])
