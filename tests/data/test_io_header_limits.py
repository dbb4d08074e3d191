"""Headers that declare more voxel data than the file holds fail before any voxel data is allocated."""
from __future__ import annotations

import gzip
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from reasonknee3d.data import io as vio
from reasonknee3d.data.io import VolumeError, inspect_volume, load_mask, load_volume


def header_only(path: Path, shape: tuple[int, ...], dtype=np.int16, data: bytes = b"") -> Path:
    """A NIfTI-1 file written by hand: the 348-byte header, the 4-byte extension flag, then ``data``."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0\0\0\0" + data
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def fails_fast(fn, *args) -> str:
    """Run ``fn`` expecting VolumeError; check it took well under a second and allocated under 1 MB."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(VolumeError) as e:
            fn(*args)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 2 ** 20, (elapsed, peak)
    return str(e.value)


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_2000_cubed_header_fails_fast_naming_the_file(tmp_path, name):
    path = header_only(tmp_path / name, (2000, 2000, 2000))
    if name.endswith(".gz"):
        assert path.stat().st_size < 120  # the whole file is a header
    msg = fails_fast(load_volume, path)
    assert str(path) in msg and "(2000, 2000, 2000)" in msg and "8000000000 voxels" in msg
    assert "at most 2147483648" in msg
    assert str(path) in fails_fast(inspect_volume, path)  # header-only inspection rejects it too


def test_plain_nii_shorter_than_its_declared_data(tmp_path):
    # 1000^3 int16 is under the voxel cap: the file size is what rules it out.
    path = header_only(tmp_path / "short.nii", (1000, 1000, 1000), data=b"\1\0" * 50)
    msg = fails_fast(load_volume, path)
    assert msg == (f"{path}: header declares shape (1000, 1000, 1000) of int16 = 2000000000 bytes of voxel data "
                   f"from byte 352, but short.nii has 452 bytes; expected at least 2000000352 "
                   f"(truncated file or corrupt header?)")


def test_gzip_declaring_more_than_it_can_expand_to(tmp_path):
    path = header_only(tmp_path / "short.nii.gz", (1000, 1000, 1000))
    msg = fails_fast(load_volume, path)
    size = path.stat().st_size
    assert msg.startswith(f"{path}: header declares shape (1000, 1000, 1000) of int16 = 2000000000 bytes")
    assert f"more than a {size}-byte gzip file can expand to" in msg


def test_compressed_cap(tmp_path, monkeypatch):
    arr = np.arange(8 * 12 * 10, dtype=np.int16).reshape(8, 12, 10)
    path = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([0.7, 0.365, 0.365, 1.0])), str(path))
    vol, _ = load_volume(path)  # within every limit
    np.testing.assert_array_equal(vol, arr)
    monkeypatch.setattr(vio, "MAX_COMPRESSED_DATA_BYTES", arr.nbytes - 1)
    with pytest.raises(VolumeError, match=r"ok\.nii\.gz: header declares shape \(8, 12, 10\) of int16 = 1920 "
                                          r"bytes of voxel data; expected at most 1919 bytes"):
        load_volume(path)


def test_truncated_plain_nii_and_mask(tmp_path):
    arr = np.arange(8 * 12 * 10, dtype=np.int16).reshape(8, 12, 10)
    good = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(arr, np.diag([0.7, 0.365, 0.365, 1.0])), str(good))
    load_volume(good)
    cut = tmp_path / "cut_mask.nii"
    cut.write_bytes(good.read_bytes()[:-2])
    with pytest.raises(VolumeError, match=r"cut_mask\.nii: header declares shape \(8, 12, 10\).*has 2270 bytes; "
                                          r"expected at least 2272"):
        load_mask(cut, inspect_volume(good))


def test_empty_axis_rejected(tmp_path):
    path = header_only(tmp_path / "empty.nii", (8, 0, 10))
    with pytest.raises(VolumeError, match=r"empty\.nii: header declares shape \(8, 0, 10\); expected at least 1"):
        load_volume(path)
