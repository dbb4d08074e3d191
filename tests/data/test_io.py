"""load_volume / load_mask: orientation rule, metadata and every bad-input error."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from reasonknee3d.data.io import SLICES_FIRST, SLICES_LAST, VolumeError, inspect_volume, load_mask, load_volume


def test_slices_first_loads_as_stored(nifti_writer, tiny):
    img = tiny.make_image(0)
    vol, meta = load_volume(nifti_writer("a.nii.gz", img))
    assert vol.dtype == np.float32 and vol.shape == tiny.SHAPE
    np.testing.assert_array_equal(vol, img)
    assert meta.axis_order == SLICES_FIRST
    assert meta.spacing == pytest.approx(tiny.SPACING)


def test_slices_last_is_transposed_by_spacing_and_affine_follows(nifti_writer, tiny):
    img = tiny.make_image(1)
    stored = img.transpose(1, 2, 0)  # (H, W, S), 0.7 mm on the last axis
    path = nifti_writer("b.nii.gz", stored, (0.365, 0.365, 0.7))
    vol, meta = load_volume(path)
    assert meta.axis_order == SLICES_LAST and meta.stored_shape == stored.shape
    np.testing.assert_array_equal(vol, img)
    assert meta.spacing == pytest.approx(tiny.SPACING)
    # The same voxel has the same world position before and after the transpose.
    stored_affine = nib.load(str(path)).affine
    s, h, w = 5, 3, 7
    np.testing.assert_allclose(meta.affine @ [s, h, w, 1], stored_affine @ [h, w, s, 1])


def test_shape_fallback_when_spacing_is_isotropic(nifti_writer, tiny):
    img = tiny.make_image(2)
    _, meta = load_volume(nifti_writer("c.nii.gz", img.transpose(1, 2, 0), (1.0, 1.0, 1.0)))
    assert meta.axis_order == SLICES_LAST  # 8 slices is the short axis
    _, meta = load_volume(nifti_writer("d.nii.gz", img, (1.0, 1.0, 1.0)))
    assert meta.axis_order == SLICES_FIRST


def test_slice_axis_in_the_middle_is_rejected(nifti_writer, tiny):
    path = nifti_writer("e.nii.gz", tiny.make_image(0).transpose(1, 0, 2), (0.365, 0.7, 0.365))
    with pytest.raises(VolumeError, match=r"e\.nii\.gz.*axis 1"):
        load_volume(path)


def test_truncated_gzip_names_file(nifti_writer, tiny, tmp_path):
    good = nifti_writer("f.nii.gz", tiny.make_image(0)).read_bytes()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(good[: len(good) * 2 // 3])
    with pytest.raises(VolumeError, match=r"trunc\.nii\.gz.*(truncated|not a readable)"):
        load_volume(bad)


def test_corrupt_file_names_file(tmp_path):
    bad = tmp_path / "junk.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(VolumeError, match=r"junk\.nii\.gz.*not a readable NIfTI"):
        load_volume(bad)


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match=r"nope\.nii\.gz: file not found"):
        load_volume(tmp_path / "nope.nii.gz")


@pytest.mark.parametrize("shape", [(12, 10), (8, 12, 10, 2)])
def test_2d_and_4d_rejected(nifti_writer, shape):
    path = nifti_writer("g.nii.gz", np.ones(shape, np.int16))
    with pytest.raises(VolumeError, match=rf"g\.nii\.gz: expected a 3D volume, got a {len(shape)}D"):
        load_volume(path)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_inf_rejected(nifti_writer, tiny, value):
    img = tiny.make_image(0).astype(np.float32)
    img[2, 3, 4] = value
    with pytest.raises(VolumeError, match=r"h\.nii\.gz: 1 NaN/Inf voxels \(first at \[2, 3, 4\]\)"):
        load_volume(nifti_writer("h.nii.gz", img))


def test_constant_volume_rejected(nifti_writer, tiny):
    with pytest.raises(VolumeError, match=r"i\.nii\.gz: constant volume"):
        load_volume(nifti_writer("i.nii.gz", np.full(tiny.SHAPE, 7, np.int16)))


def test_mask_follows_image_transpose(nifti_writer, tiny):
    mask = tiny.make_mask(1)
    img_path = nifti_writer("j.nii.gz", tiny.make_image(1).transpose(1, 2, 0), (0.365, 0.365, 0.7))
    mask_path = nifti_writer("j_mask.nii.gz", mask.transpose(1, 2, 0), (0.365, 0.365, 0.7))
    out = load_mask(mask_path, inspect_volume(img_path))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, mask)


def test_mask_shape_mismatch_names_both_files(nifti_writer, tiny):
    img_path = nifti_writer("k.nii.gz", tiny.make_image(0))
    mask_path = nifti_writer("k_mask.nii.gz", np.zeros((8, 12, 9), np.uint8))
    with pytest.raises(VolumeError, match=r"k_mask\.nii\.gz: mask shape \(8, 12, 9\) differs from its volume "
                                          r".*k\.nii\.gz of shape \(8, 12, 10\)"):
        load_mask(mask_path, inspect_volume(img_path))


def test_mask_with_fractional_labels_rejected(nifti_writer, tiny):
    img_path = nifti_writer("l.nii.gz", tiny.make_image(0))
    mask_path = nifti_writer("l_mask.nii.gz", np.full(tiny.SHAPE, 0.5, np.float32))
    with pytest.raises(VolumeError, match=r"l_mask\.nii\.gz: mask has non-integer labels"):
        load_mask(mask_path, inspect_volume(img_path))
