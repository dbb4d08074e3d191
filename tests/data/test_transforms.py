"""Preprocessing config and pipelines; boxes follow every geometric transform (mask box vs moved box)."""
from __future__ import annotations


import numpy as np
import pytest

from reasonknee3d.config import ConfigError, from_mapping
import torch

from reasonknee3d.boxes import box_from_mask
from reasonknee3d.data.transforms import (PreprocessConfig, build_preprocess, build_train_augment,
                                          preprocess_volume)


def test_config_validation_and_yaml(tmp_path):
    with pytest.raises(ValueError, match=r"normalization must be one of .* got 'l2'"):
        PreprocessConfig(normalization="l2")
    with pytest.raises(ValueError, match=r"clip_percentiles .* got \(99\.0, 1\.0\)"):
        PreprocessConfig(clip_percentiles=(99, 1))
    with pytest.raises(ValueError, match=r"input_shape must be 3 positive ints"):
        PreprocessConfig(input_shape=(8, 8))
    cfg = from_mapping(PreprocessConfig, {"input_shape": [4, 6, 6], "normalization": "minmax"}, "data")
    assert cfg.input_shape == (4, 6, 6) and cfg.normalization == "minmax" and cfg.zoom_range == (0.9, 1.1)
    with pytest.raises(ConfigError, match=r"data\.input_size: unknown key"):
        from_mapping(PreprocessConfig, {"input_size": [4, 6, 6]}, "data")
    with pytest.raises(ConfigError, match=r"data\.input_shape\[1\]: expected int, got 'six'"):
        from_mapping(PreprocessConfig, {"input_shape": [4, "six", 6]}, "data")


def test_array_settings_exclude_augmentation():
    a = PreprocessConfig().array_settings()
    assert a == PreprocessConfig(augment_prob=0.0, zoom_range=(1.0, 1.0)).array_settings()
    assert a != PreprocessConfig(clip_percentiles=(1, 99)).array_settings()


@pytest.mark.parametrize("normalization", ["zscore", "minmax"])
def test_preprocess_shape_and_intensity(nifti_writer, tiny, normalization):
    img = tiny.make_image(0).astype(np.float32)
    img[0, 0, 0] = 30000  # one hot outlier: clipped away by the percentiles
    cfg = PreprocessConfig(input_shape=(4, 6, 5), normalization=normalization, clip_percentiles=(1, 99))
    arr, orig = preprocess_volume(nifti_writer("a.nii.gz", img), cfg)
    assert arr.shape == (4, 6, 5) and arr.dtype == np.float32 and orig == tiny.SHAPE
    if normalization == "minmax":
        assert arr.min() >= 0 and arr.max() <= 1
    else:
        assert abs(arr.mean()) < 0.2 and arr.max() < 5  # the outlier did not survive


def test_preprocess_orients_slices_last_volumes(nifti_writer, tiny):
    img = tiny.make_image(1)
    cfg = PreprocessConfig(input_shape=(4, 6, 5))
    a, _ = preprocess_volume(nifti_writer("a.nii.gz", img), cfg)
    b, orig = preprocess_volume(nifti_writer("b.nii.gz", img.transpose(1, 2, 0), (0.365, 0.365, 0.7)), cfg)
    assert orig == tiny.SHAPE
    np.testing.assert_allclose(a, b, atol=1e-5)


def _mask_box_matches(mask: torch.Tensor, box: list[int], labels) -> None:
    expected = box_from_mask(np.asarray(mask)[0], labels)
    assert expected is not None
    np.testing.assert_allclose(box, expected, atol=1)


@pytest.mark.parametrize("shape", [(4, 6, 5), (16, 24, 20), (5, 7, 3)])
def test_box_follows_resize(nifti_writer, tiny, shape):
    mask = tiny.make_mask(1)
    pipe = build_preprocess(PreprocessConfig(input_shape=shape), with_mask=True)
    for labels in ([1], [2], [1, 2]):
        d = pipe({"image": nifti_writer("a.nii.gz", tiny.make_image(1)),
                  "mask": nifti_writer("m.nii.gz", mask), "box": box_from_mask(mask, labels)})
        assert tuple(d["image"].shape) == (1, *shape) and tuple(d["mask"].shape) == (1, *shape)
        _mask_box_matches(d["mask"], d["box"], labels)


def test_box_follows_random_zoom():
    rng = np.random.default_rng(0)
    cfg = PreprocessConfig(augment_prob=1.0, zoom_range=(0.7, 1.3))
    aug = build_train_augment(cfg, with_mask=True)
    moved = 0
    for seed in range(12):
        shape = (16, 32, 28)
        lo = rng.integers(3, 7, size=3)
        hi = lo + rng.integers(2, 8, size=3)
        mask = np.zeros((1, *shape), np.uint8)
        mask[0, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = 1
        box = box_from_mask(mask[0])
        aug.set_random_state(seed=seed)
        d = aug({"image": torch.rand(1, *shape), "mask": torch.from_numpy(mask), "box": box})
        assert tuple(d["image"].shape) == (1, *shape)  # size kept
        _mask_box_matches(d["mask"], d["box"], [1])
        moved += d["box"] != box
    assert moved >= 6  # the zoom really moved the boxes


def test_augment_without_box_and_intensity_jitter():
    aug = build_train_augment(PreprocessConfig(augment_prob=1.0, zoom_range=(1.0, 1.0)))
    aug.set_random_state(seed=1)
    img = torch.rand(1, 4, 6, 6)
    d = aug({"image": img.clone(), "box": None})
    assert d["box"] is None
    assert not torch.allclose(torch.as_tensor(d["image"]), img)


def test_every_preset_loads():
    from reasonknee3d.families import load_experiment_config, preset_names
    assert len(preset_names()) >= 4
    for name in preset_names():
        assert isinstance(load_experiment_config(name).data, PreprocessConfig)


def test_canonical_side_mirrors_the_other_knee_along_the_slice_axis(release):
    from reasonknee3d.data.release import ReleaseError
    from reasonknee3d.data.transforms import PreprocessConfig, preprocess_volume
    paths = sorted(release.images.values())
    right = next(p for p in paths if p.name.endswith("_right.nii.gz"))
    left = next(p for p in paths if p.name.endswith("_left.nii.gz"))
    plain, canon = PreprocessConfig(input_shape=(4, 6, 5)), PreprocessConfig(input_shape=(4, 6, 5),
                                                                             canonical_side="right")
    assert not canon.mirrors(right) and canon.mirrors(left) and not plain.mirrors(left)
    assert canon.mirrors("anything.nii.gz", knee_side="left")
    with pytest.raises(ReleaseError, match="knee side"):
        canon.mirrors("knee.nii.gz")
    assert np.array_equal(preprocess_volume(left, canon)[0], preprocess_volume(left, plain)[0][::-1])
    assert np.array_equal(preprocess_volume(right, canon)[0], preprocess_volume(right, plain)[0])
    # the setting is part of the cache key only when set (caches written before it keep their keys)
    assert "canonical_side" not in plain.array_settings() and canon.array_settings()["canonical_side"] == "right"
    with pytest.raises(ValueError, match="canonical_side"):
        PreprocessConfig(canonical_side="medial")
