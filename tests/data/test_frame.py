"""data.recentre and the VolumeFrame: volumes moved onto their intensity centroid, boxes carried there and back."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from reasonknee3d.boxes import box_to_text, clip_boxes, mirror_boxes
from reasonknee3d.config import ConfigError, from_mapping
from reasonknee3d.data.cache import VolumeCache, preprocess_release
from reasonknee3d.data.dataset import VolumeQADataset
from reasonknee3d.data.frame import VolumeFrame, centring_offset, intensity_centroid, shift_array
from reasonknee3d.data.mask_cache import MaskCache
from reasonknee3d.data.release import ReleaseLoader, iter_samples
from reasonknee3d.data.transforms import PreprocessConfig, preprocess_volume, preprocess_volume_frame

SHAPE = (8, 12, 10)  # the tiny release's loaded shape (tests/data/conftest.py)
RECENTRE = dict(recentre="centroid")


def write_nifti(path, arr):
    import nibabel as nib
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([0.7, 0.365, 0.365, 1.0])), str(path))
    return path


def _boxes(shape, step=1):
    """Every box with min <= max inside ``shape`` on a coarse lattice (``step``)."""
    out = []
    for axis in range(3):
        out.append([(a, b) for a in range(0, shape[axis], step) for b in range(a, shape[axis], step)])
    return [[*x, *y, *z] for x, y, z in itertools.product(*out)][::7]


@pytest.mark.parametrize("mirrored", [False, True])
@pytest.mark.parametrize("offset", [(0, 0, 0), (1, -2, 1)])
@pytest.mark.parametrize("model_shape", [(8, 12, 10), (16, 24, 20)])
def test_box_round_trip_stored_model_stored_is_exact_inside_the_grid(mirrored, offset, model_shape):
    frame = VolumeFrame((8, 12, 10), model_shape, mirrored, offset)
    n = 0
    for box in _boxes((8, 12, 10)):
        model = frame.box_to_model(box)
        lo = np.repeat(np.asarray(model_shape) - 1, 2)
        # boxes whose moved box would leave the model grid are clipped there; the others come back exactly
        unclipped = _unclipped_model_box(frame, box)
        if np.any(unclipped < 0) or np.any(unclipped > lo):
            continue
        n += 1
        assert model == unclipped.tolist()
        assert frame.box_to_stored(model) == box
        text = f"Location: {box_to_text(box)}"
        assert frame.text_to_stored(frame.text_to_model(text)) == text
    assert n > 100


def _unclipped_model_box(frame, box):
    """The model-frame box by hand: scale by an integer factor, mirror, move."""
    f = np.asarray(frame.model_shape) // np.asarray(frame.stored_shape)
    b = np.asarray(box).reshape(3, 2)
    b = np.stack([b[:, 0] * f, (b[:, 1] + 1) * f - 1], 1).reshape(6)
    if frame.mirrored:
        b = mirror_boxes(b, frame.model_shape)
    return b + np.repeat(frame.offset, 2)


def test_frame_by_hand_values_and_downscaled_round_trip():
    frame = VolumeFrame((8, 12, 10), (8, 12, 10), True, (1, -2, 0))
    # mirror [1, 2] on axis 0 of 8 -> [5, 6], then +1; axis 1 -2; axis 2 unchanged
    assert frame.box_to_model([1, 2, 3, 4, 5, 6]) == [6, 7, 1, 2, 5, 6]
    assert frame.box_to_stored([6, 7, 1, 2, 5, 6]) == [1, 2, 3, 4, 5, 6]
    assert frame.text_to_model("a <|box_start|>[1, 2, 3, 4, 5, 6]<|box_end|> b") == \
        "a <|box_start|>[6, 7, 1, 2, 5, 6]<|box_end|> b"
    # leaving the grid: clipped, ints
    assert frame.box_to_model([0, 1, 0, 1, 0, 9]) == [7, 7, 0, 0, 0, 9]
    assert frame.text_to_stored("<|box_start|>[0, 7, 0, 11, 0, 9]<|box_end|>") == \
        "<|box_start|>[1, 7, 2, 11, 0, 9]<|box_end|>"  # -1 -> [-1, 6] -> clipped [0, 6] -> mirrored
    # a span that is not a box is left alone
    assert frame.text_to_stored("<|box_start|>[1, 2]<|box_end|>") == "<|box_start|>[1, 2]<|box_end|>"
    # halving: the offset in stored voxels doubles; boxes on the 2-voxel lattice come back exactly
    half = VolumeFrame((8, 12, 10), (4, 6, 5), True, (1, 0, -1))
    assert half.text_offset == (2, 0, -2)
    for box in [[4, 5, 2, 7, 4, 7], [2, 5, 0, 1, 2, 9], [4, 7, 6, 11, 4, 5]]:
        assert half.box_to_stored(half.box_to_model(box)) == box
    # the plain frame is the resize alone and leaves texts untouched
    plain = VolumeFrame((8, 12, 10), (4, 6, 5))
    assert plain.text_to_model("<|box_start|>[9, 1, 0, 0, 0, 0]<|box_end|>") == \
        "<|box_start|>[9, 1, 0, 0, 0, 0]<|box_end|>"
    assert VolumeFrame.from_meta({"orig_shape": [8, 12, 10], "input_shape": [4, 6, 5]}, False) == plain


def test_shift_array_fills_vacated_voxels_without_wrapping():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    out = shift_array(a, (1, -1, 2), -5.0)
    expected = np.full_like(a, -5.0)
    expected[1:, :2, 2:] = a[:1, 1:, :2]
    np.testing.assert_array_equal(out, expected)
    assert shift_array(a, (0, 0, 0), 0) is a
    assert (shift_array(a, (2, 0, 0), 7.0) == 7.0).all()
    assert centring_offset([1.0, 2.2, 0.4], (4, 5, 6)) == (0, 0, 2)


def _blob_volume(shape=(16, 20, 18), where=(slice(2, 5), slice(3, 7), slice(11, 15))):
    v = np.zeros(shape, dtype=np.int16)
    v[where] = 1000
    return v


@pytest.mark.parametrize("side", ["right", "left"])
def test_off_centre_blob_ends_within_half_a_voxel_of_the_centre(tmp_path, side):
    path = write_nifti(tmp_path / f"1.2_3.4_{side}.nii.gz", _blob_volume())
    plain_cfg = PreprocessConfig(input_shape=(16, 20, 18), canonical_side="right")
    cfg = PreprocessConfig(input_shape=(16, 20, 18), canonical_side="right", **RECENTRE)
    arr, frame = preprocess_volume_frame(path, cfg)
    plain = preprocess_volume(path, plain_cfg)[0]
    centre = (np.asarray(arr.shape) - 1) / 2
    before, after = intensity_centroid(plain), intensity_centroid(arr)
    assert np.abs(before - centre).max() > 3  # it started off centre
    assert np.abs(after - centre).max() <= 0.5
    # the blob's centre 3.0 (mirrored: 12.0), 4.5, 12.5 -> centre 7.5, 9.5, 8.5 (halves round to even)
    assert frame.offset == ((4, 5, -4) if side == "right" else (-4, 5, -4))
    assert frame.mirrored == (side == "left") and frame.stored_shape == frame.model_shape == (16, 20, 18)
    # moved, not rolled: the vacated voxels hold the array's minimum
    np.testing.assert_array_equal(arr, shift_array(plain, frame.offset, plain.min()))
    assert preprocess_volume(path, cfg)[1] == (16, 20, 18)


def test_a_volume_without_positive_intensities_is_a_volume_error_naming_it(tmp_path):
    from reasonknee3d.data.io import VolumeError
    dark = np.full((6, 8, 8), -5, dtype=np.int16)
    dark[2, 3, 4] = -1  # not constant, so loading accepts it
    path = write_nifti(tmp_path / "dark_right.nii.gz", dark)
    with pytest.raises(VolumeError, match=r"dark_right\.nii\.gz: data\.recentre: .*no centroid"):
        preprocess_volume(path, PreprocessConfig(input_shape=(6, 8, 8), **RECENTRE))
    assert preprocess_volume(path, PreprocessConfig(input_shape=(6, 8, 8)))[1] == (6, 8, 8)


def test_recentre_setting_validation_and_cache_keys(release, tmp_path):
    with pytest.raises(ValueError, match=r"recentre must be one of \('centroid',\) or null, got 'mean'"):
        PreprocessConfig(recentre="mean")
    with pytest.raises(ConfigError, match=r"data.*recentre"):
        from_mapping(PreprocessConfig, {"recentre": "median"}, "data")
    assert from_mapping(PreprocessConfig, {"recentre": "centroid"}, "data").recentre == "centroid"
    plain, moved = PreprocessConfig(input_shape=(4, 6, 5)), PreprocessConfig(input_shape=(4, 6, 5), **RECENTRE)
    # unset, the key's settings are exactly what they were before the field existed
    assert plain.array_settings() == {"input_shape": [4, 6, 5], "clip_percentiles": [0.5, 99.5],
                                      "normalization": "zscore", "interpolation": "area"}
    assert moved.array_settings() == {**plain.array_settings(), "recentre": "centroid"}
    path = next(iter(release.images.values()))
    assert VolumeCache(tmp_path, plain).key(path) != VolumeCache(tmp_path, moved).key(path)
    masks = MaskCache(tmp_path, plain)
    assert masks.settings() == {"input_shape": [4, 6, 5], "canonical_side": None}
    assert MaskCache(tmp_path, moved).settings() == {**masks.settings(), "recentre": "centroid"}


@pytest.fixture
def blob_release(release):
    """The tiny release with its images replaced by the bright label blocks on a dark background, off centre."""
    for vid, path in release.images.items():
        write_nifti(path, (1000 * (release.masks[vid] > 0) + 1).astype(np.int16))
    return release


def test_cache_meta_holds_the_offset_and_the_mask_follows_the_volume(blob_release, tmp_path):
    cfg = PreprocessConfig(input_shape=SHAPE, canonical_side="right", **RECENTRE)
    plain_cfg = PreprocessConfig(input_shape=SHAPE, canonical_side="right")
    assert preprocess_release(blob_release.root, cfg, cache_dir=tmp_path / "v").ok
    assert preprocess_release(blob_release.root, plain_cfg, cache_dir=tmp_path / "p").ok
    cache, plain = VolumeCache(tmp_path / "v", cfg), VolumeCache(tmp_path / "p", plain_cfg)
    masks, plain_masks = MaskCache(tmp_path / "m", cfg), MaskCache(tmp_path / "pm", plain_cfg)
    offsets = []
    for rec in ReleaseLoader(blob_release.root).volumes("test"):
        arr, meta = cache.load(rec.image_path)
        ref, plain_meta = plain.load(rec.image_path)
        assert "offset" not in plain_meta
        offset = tuple(meta["offset"])
        assert offset == preprocess_volume_frame(rec.image_path, cfg)[1].offset
        offsets.append(offset)
        np.testing.assert_array_equal(arr, shift_array(np.asarray(ref), offset, np.asarray(ref).min()))
        frame = cache.frame(rec.image_path, meta)
        assert frame == VolumeFrame(SHAPE, SHAPE, rec.knee_side == "left", offset)
        # the mask moves by the same offset (0 in the vacated voxels) and still covers the bright voxels
        mask_meta = masks.put(rec.image_path, rec.mask_path)
        mask = masks.load(rec.image_path, rec.mask_path)[0]
        plain_mask = plain_masks.put(rec.image_path, rec.mask_path) and plain_masks.load(rec.image_path,
                                                                                          rec.mask_path)[0]
        assert mask_meta["offset"] == list(offset)
        np.testing.assert_array_equal(mask, shift_array(np.asarray(plain_mask), offset, 0))
        np.testing.assert_array_equal(mask > 0, np.asarray(arr) > np.asarray(arr).min() + 1)
        # given the volume's offset, the mask does not recompute it
        assert masks.put(rec.image_path, rec.mask_path, offset=offset)["offset"] == list(offset)
    assert any(any(o) for o in offsets)


def test_training_sample_box_and_answer_are_in_the_moved_frame(blob_release, tmp_path):
    cfg = PreprocessConfig(input_shape=SHAPE, canonical_side="right", **RECENTRE)
    assert preprocess_release(blob_release.root, cfg, cache_dir=tmp_path / "v").ok
    cache = VolumeCache(tmp_path / "v", cfg)
    samples = list(iter_samples(blob_release.root, "test"))
    ds = VolumeQADataset(samples, cache)
    checked = 0
    for i, s in enumerate(samples):
        item = ds[i]
        offset = tuple(cache.load(s.image_path)[1]["offset"])
        assert item["frame"].offset == offset and item["mirrored"] == (s.knee_side == "left")
        if s.box is None:
            assert item["box"] is None and item["answer"] == s.answer
            continue
        by_hand = mirror_boxes(s.box, SHAPE) if s.knee_side == "left" else np.asarray(s.box)
        by_hand = [int(v) for v in clip_boxes(by_hand + np.repeat(offset, 2), SHAPE)]
        assert item["box"] == by_hand
        assert item["answer"] == s.answer.replace(box_to_text(s.box), box_to_text(by_hand))
        # the box covers the same bright voxels of the moved volume as the stored box does of the stored volume
        vol = item["volume"][0].float().numpy()
        lo = vol.min()
        b = item["box"]
        assert (vol[b[0]:b[1] + 1, b[2]:b[3] + 1, b[4]:b[5] + 1] > lo + 1).any()
        checked += any(offset)
    assert checked > 0


def test_unset_recentre_leaves_items_as_before(release, tmp_path):
    cfg = PreprocessConfig(input_shape=(4, 6, 5))
    assert preprocess_release(release.root, cfg, cache_dir=tmp_path / "c").ok
    samples = list(iter_samples(release.root, "test"))
    item = VolumeQADataset(samples, VolumeCache(tmp_path / "c", cfg))[0]
    assert item["frame"] == VolumeFrame(SHAPE, (4, 6, 5)) and item["answer"] == samples[0].answer
    assert torch.equal(item["volume"][0], torch.from_numpy(preprocess_volume(samples[0].image_path, cfg)[0]).half())


def test_region_grade_rois_are_in_the_moved_frame(blob_release, tmp_path):
    from reasonknee3d.models.reasonknee3d.region_heads import grade_heads
    from reasonknee3d.training.region_grades import RegionGradeDataset
    cfg = PreprocessConfig(input_shape=SHAPE, canonical_side="right", cache_dir=str(tmp_path / "c"), **RECENTRE)
    ds = RegionGradeDataset(blob_release.root, "test", cfg, grade_heads())
    moved = 0
    for i, group in enumerate(ds.groups):
        offset = tuple(ds.cache.load(ds.volumes[i])[1]["offset"])
        rois = ds[i]["rois"]
        for s, roi in zip(group, rois):
            by_hand = mirror_boxes(s.box, SHAPE) if s.knee_side == "left" else np.asarray(s.box)
            assert roi == [int(v) for v in clip_boxes(by_hand + np.repeat(offset, 2), SHAPE)]
        moved += any(offset)
    assert moved > 0


def test_segmentation_items_keep_mask_and_volume_aligned(blob_release, tmp_path, monkeypatch):
    from reasonknee3d.training.segmentation import SegmentationDataset
    cfg = PreprocessConfig(input_shape=SHAPE, canonical_side="right", cache_dir=str(tmp_path / "c"), **RECENTRE)
    # the masks take the offset the volume cache recorded (the volume is not preprocessed a second time)
    assert preprocess_release(blob_release.root, cfg, cache_dir=tmp_path / "c" / "volumes").ok
    monkeypatch.setattr("reasonknee3d.data.mask_cache.preprocess_volume_frame",
                        lambda *a, **k: pytest.fail("the mask cache recomputed the volume's offset"))
    ds = SegmentationDataset(blob_release.root, "test", cfg)
    assert len(ds) == len(blob_release.images)
    moved = 0
    for i in range(len(ds)):
        item = ds[i]
        vol, mask = item["volume"][0].float().numpy(), item["mask"][0].numpy()
        np.testing.assert_array_equal(mask > 0, vol > vol.min() + 1)
        moved += any(ds.metas[i]["offset"])
    assert moved > 0
