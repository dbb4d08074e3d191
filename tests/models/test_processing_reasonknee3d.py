"""ReasonKnee3DProcessor: placeholder expansion, labels, padding, coordinate-token round trip, save/load."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from reasonknee3d.boxes import box_to_text, dequantize_boxes, quantize_boxes
from reasonknee3d.constants import IGNORE_INDEX, VOLUME_PAD
from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration
from reasonknee3d.models.reasonknee3d.processing_reasonknee3d import ReasonKnee3DProcessor

ANSWER = "Bright marrow signal.\nLocation: {box}\nFinal diagnosis: {{\"patella medial BML\": {{\"x\": 1}}}}"


@pytest.fixture(scope="module")
def processor(rk3d_dir) -> ReasonKnee3DProcessor:
    return AutoProcessor.from_pretrained(rk3d_dir)


def test_auto_processor_round_trip_keeps_the_settings(rk3d_dir, processor):
    assert isinstance(processor, ReasonKnee3DProcessor)
    model = ReasonKnee3DForConditionalGeneration.from_pretrained(rk3d_dir)
    assert processor.num_visual_tokens == model.config.num_visual_tokens == 16
    assert processor.volume_size == [8, 16, 16] and processor.num_bins == model.config.num_bins == 16


def test_placeholders_are_expanded_and_only_answers_carry_labels(processor):
    vols = torch.randn(2, 1, 8, 16, 16)
    answers = [ANSWER.format(box=box_to_text([1, 3, 0, 15, 4, 9])), "No lesion.\nFinal diagnosis: {}"]
    batch = processor(vols, ["Grade the patella BML.", "Is there a lesion?"], answers=answers)
    pad_id = processor.tokenizer.convert_tokens_to_ids(VOLUME_PAD)
    assert (batch["input_ids"] == pad_id).sum(1).tolist() == [16, 16]
    assert batch["volumes"].shape == (2, 1, 8, 16, 16)
    for row in range(2):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        answer_ids = ids[labels != IGNORE_INDEX]
        text = processor.tokenizer.decode(answer_ids, skip_special_tokens=False)
        assert text.startswith(answers[row].split("<|box_start|>")[0]) and text.endswith("<|im_end|>")
        assert torch.equal(labels[labels != IGNORE_INDEX], answer_ids)
        assert mask[0] == 1  # training batches pad on the right
    # Default orig shape = volume_size (8, 16, 16), K = 16: axis 0 has two bins per slice.
    coords = "".join(f"<|coord_{k}|>" for k in (3, 7, 0, 15, 4, 9))
    assert f"<|box_start|>{coords}<|box_end|>" in processor.tokenizer.decode(batch["input_ids"][0],
                                                                           skip_special_tokens=False)


def test_generation_batches_pad_on_the_left_and_have_no_labels(processor):
    batch = processor(torch.randn(2, 1, 8, 16, 16), ["short", "a much longer question about the knee"])
    assert "labels" not in batch
    assert batch["attention_mask"][:, -1].tolist() == [1, 1] and batch["attention_mask"][0, 0] == 0


@pytest.mark.parametrize("orig_shape", [(8, 16, 16), (160, 384, 384)])
def test_boxes_round_trip_through_coordinate_tokens(processor, orig_shape):
    box = [2, 5, 0, 11, 7, 15] if orig_shape[0] == 8 else [40, 79, 96, 191, 240, 383]
    batch = processor(torch.randn(1, 1, 8, 16, 16), ["q"], answers=[ANSWER.format(box=box_to_text(box))],
                      orig_shapes=[orig_shape])
    answer_ids = batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]
    decoded = processor.batch_decode([answer_ids], orig_shapes=[orig_shape])[0]
    # K = 16 is exact on 8/16-voxel axes; on the real grid each coordinate comes back as its bin centre.
    expected = dequantize_boxes(quantize_boxes(box, orig_shape, 16), orig_shape, 16)
    assert decoded == ANSWER.format(box=box_to_text(expected))
    assert (expected == box).all() == (orig_shape[0] == 8)


def test_paths_are_preprocessed_with_the_saved_settings(processor, tmp_path):
    arr = np.random.default_rng(0).normal(size=(12, 20, 24)).astype(np.float32)
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([0.7, 0.365, 0.365, 1.0])), path)
    vol, shape = processor.load_volume(path)
    assert vol.shape == (1, 8, 16, 16) and shape == (12, 20, 24)


def test_wrong_volume_shape_names_both_shapes(processor):
    with pytest.raises(ValueError, match=r"\(1, 9, 16, 16\).*\(8, 16, 16\)"):
        processor(torch.randn(1, 1, 9, 16, 16), ["q"])


def test_canonical_side_paths_are_mirrored_and_decoded_back(processor, tmp_path):
    import copy

    from reasonknee3d.boxes import box_to_coord_tokens
    arr = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    paths = {}
    for side in ("left", "right"):
        paths[side] = tmp_path / f"1.2_3.4_{side}.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.diag([0.7, 0.365, 0.365, 1.0])), paths[side])
    canon = copy.deepcopy(processor)
    canon.preprocess = {**processor.preprocess, "canonical_side": "right"}
    assert [canon.mirrors(paths["left"]), canon.mirrors(paths["right"])] == [True, False]
    assert not processor.mirrors(paths["left"]) and not canon.mirrors(arr)
    left, _ = canon.load_volume(paths["left"])
    right, _ = canon.load_volume(paths["right"])
    assert torch.equal(left, right.flip(1))
    ids = processor.tokenizer(box_to_coord_tokens([1, 2, 0, 15, 3, 4], (8, 16, 16), 16),
                              add_special_tokens=False).input_ids
    texts = canon.batch_decode([ids, ids], orig_shapes=[(8, 16, 16)] * 2, mirrored=[True, False])
    assert texts == ["<|box_start|>[5, 6, 0, 15, 3, 4]<|box_end|>", "<|box_start|>[1, 2, 0, 15, 3, 4]<|box_end|>"]
