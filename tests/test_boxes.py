"""Box convention, IoU and quantization on hand-computed cases."""
import numpy as np
import pytest

from reasonknee3d import boxes as B


def test_volume_inclusive():
    assert B.box_volume([0, 0, 0, 0, 0, 0]) == 1
    assert B.box_volume([2, 3, 0, 4, 10, 10]) == 2 * 5 * 1


@pytest.mark.parametrize("a,b,expected", [
    ([0, 9, 0, 9, 0, 9], [0, 9, 0, 9, 0, 9], 1.0),                     # identical
    ([0, 4, 0, 4, 0, 4], [10, 14, 0, 4, 0, 4], 0.0),                   # disjoint
    ([0, 4, 0, 4, 0, 4], [5, 9, 0, 4, 0, 4], 0.0),                     # touching faces share no voxel
    ([0, 4, 0, 4, 0, 4], [4, 8, 0, 4, 0, 4], 25 / (125 + 125 - 25)),   # overlap of one voxel layer
    ([0, 9, 0, 9, 0, 9], [0, 4, 0, 9, 0, 9], 0.5),                     # nested: 500 / 1000
    ([0, 9, 0, 9, 0, 9], [5, 14, 0, 9, 0, 9], 500 / 1500),             # half overlap along one axis
    ([3, 3, 3, 3, 3, 3], [3, 3, 3, 3, 3, 3], 1.0),                     # single voxel, same
    ([3, 3, 3, 3, 3, 3], [3, 3, 3, 3, 3, 4], 0.5),                     # single voxel inside a 2-voxel box
])
def test_iou_hand_computed(a, b, expected):
    assert B.iou_3d(a, b) == pytest.approx(expected)
    assert B.iou_3d(b, a) == pytest.approx(expected)


def test_iou_vectorized_matches_scalar():
    rng = np.random.default_rng(0)
    lo = rng.integers(0, 50, size=(200, 3))
    hi = lo + rng.integers(0, 20, size=(200, 3))
    a = np.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1], lo[:, 2], hi[:, 2]], axis=1)
    b = np.roll(a, 1, axis=0)
    vec = B.iou_3d(a, b)
    assert vec.shape == (200,)
    assert np.allclose(vec, [B.iou_3d(x, y) for x, y in zip(a, b)])


def test_validate_and_repair():
    assert B.validate_box([1, 2, 3, 4, 5, 6], shape=(10, 10, 10)) == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="min > max"):
        B.validate_box([5, 2, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="does not fit"):
        B.validate_box([0, 10, 0, 1, 0, 1], shape=(10, 10, 10))
    with pytest.raises(ValueError, match="6 values"):
        B.validate_box([1, 2, 3])
    fixed, rep = B.repair_boxes([[5, 2, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1]])
    assert fixed.tolist() == [[2, 5, 0, 1, 0, 1], [0, 1, 0, 1, 0, 1]] and rep.tolist() == [True, False]


def test_box_from_mask():
    m = np.zeros((8, 9, 10), np.uint8)
    m[2:5, 3, 4:9] = 7
    m[6, 0, 0] = 3
    assert B.box_from_mask(m, labels=[7]) == [2, 4, 3, 3, 4, 8]
    assert B.box_from_mask(m) == [2, 6, 0, 3, 0, 8]
    assert B.box_from_mask(m, labels=[9]) is None


def test_corners_round_trip_and_scale():
    box = [2, 5, 10, 20, 0, 0]
    assert B.from_corners(B.to_corners(box)).tolist() == box
    # halving every axis maps voxels [2..5] -> [1..2], [10..20] -> [5..10], [0..0] -> [0..0]
    assert B.scale_boxes(box, (40, 40, 40), (20, 20, 20)).tolist() == [1, 2, 5, 10, 0, 0]


@pytest.mark.parametrize("k", [384, 512, 1000])
def test_quantize_round_trip_exact_when_bins_cover_voxels(k):
    shape = (160, 384, 384)
    box = [0, 159, 17, 200, 383, 383]
    bins = B.quantize_boxes(box, shape, k)
    assert bins.min() >= 0 and bins.max() < k
    assert B.dequantize_boxes(bins, shape, k).tolist() == box


def test_quantize_coarse_bins_keep_order_and_bounds():
    shape = (160, 384, 384)
    rng = np.random.default_rng(1)
    lo = rng.integers(0, 100, size=(500, 3))
    hi = lo + rng.integers(0, 50, size=(500, 3))
    boxes = np.stack([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1], lo[:, 2], hi[:, 2]], axis=1)
    back = B.dequantize_boxes(B.quantize_boxes(boxes, shape, 64), shape, 64)
    assert np.all(back[:, [0, 2, 4]] <= back[:, [1, 3, 5]])
    assert np.all(np.abs(back - boxes) <= np.repeat(np.array(shape) / 64, 2))


def test_text_forms_round_trip():
    shape, k = (64, 64, 64), 64  # one bin per voxel: bins equal indices
    text = "step one\nLocation: " + B.box_to_text([1, 5, 10, 20, 30, 40]) + "\nFinal diagnosis: {}"
    assert "<|box_start|>[1, 5, 10, 20, 30, 40]<|box_end|>" in text
    tok = B.voxel_text_to_coord_tokens(text, shape, k)
    assert "<|coord_1|><|coord_5|><|coord_10|><|coord_20|><|coord_30|><|coord_40|>" in tok
    assert B.coord_tokens_to_text(tok, shape, k) == text


def test_coord_tokens_to_text_keeps_a_reversed_generated_box_for_the_scorer():
    # Unconstrained generation may emit max < min; decoding must not raise (the scorer repairs and counts it).
    tokens = "Location: <|box_start|>" + "".join(f"<|coord_{k}|>" for k in (5, 2, 0, 63, 10, 10)) + "<|box_end|>"
    text = B.coord_tokens_to_text(tokens, (64, 64, 64), 64)
    assert text == "Location: <|box_start|>[5, 2, 0, 63, 10, 10]<|box_end|>"
    from reasonknee3d.parsing import parse_output
    from reasonknee3d.schema import get_question
    parsed = parse_output(text, get_question(1))
    assert list(parsed.box) == [2, 5, 0, 63, 10, 10] and parsed.box_repaired


def test_mirror_boxes_by_hand_and_twice_is_identity():
    shape = (10, 20, 30)
    assert B.mirror_boxes([1, 3, 4, 5, 6, 7], shape).tolist() == [6, 8, 4, 5, 6, 7]  # 9-3, 9-1
    rng = np.random.default_rng(0)
    lo = rng.integers(0, 5, size=(50, 3))
    boxes = np.stack([lo[:, 0], lo[:, 0] + 4, lo[:, 1], lo[:, 1] + 3, lo[:, 2], lo[:, 2] + 2], 1)
    assert np.array_equal(B.mirror_boxes(B.mirror_boxes(boxes, shape), shape), boxes)
    # IoU is preserved when both boxes are mirrored
    a, b = boxes[:25], boxes[25:]
    assert np.allclose(B.iou_3d(a, b), B.iou_3d(B.mirror_boxes(a, shape), B.mirror_boxes(b, shape)))


def test_mirror_text_boxes_rewrites_voxel_boxes_only():
    text = "x\nLocation: <|box_start|>[1, 3, 4, 5, 6, 7]<|box_end|>\nFinal diagnosis: {}"
    assert B.mirror_text_boxes(text, (10, 20, 30)) == text.replace("[1, 3,", "[6, 8,")
    odd = "<|box_start|>[1, 2]<|box_end|> <|box_start|>[a, b, c, d, e, f]<|box_end|>"
    assert B.mirror_text_boxes(odd, (10, 20, 30)) == odd  # left for the scorer to judge
