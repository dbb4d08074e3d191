"""DICOM series -> NIfTI on small sagittal series the tests write with pydicom (shuffled file names)."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from reasonknee3d import cli
from reasonknee3d.data.dicom import DicomSeriesError, convert_dicom, read_dicom_series
from reasonknee3d.data.io import load_volume

# OAI-like sagittal geometry in LPS: rows run along +y (posterior), columns down -z (inferior).
SAGITTAL_IOP = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]


def write_series(folder: Path, vol: np.ndarray, iop: Sequence[float] = SAGITTAL_IOP,
                 positions: Optional[Sequence[float]] = None, pixel_spacing=(0.4, 0.3), seed: int = 0,
                 series_uid: Optional[str] = None) -> list[Path]:
    """One file per slice ``vol[s]`` (Rows x Columns), slice s at x = positions[s]; files named in shuffled order."""
    folder.mkdir(parents=True, exist_ok=True)
    n = vol.shape[0]
    # Default: slice s at x = 10 - 0.7 s, i.e. increasing along the normal row_dir x col_dir = -x.
    positions = [10.0 - 0.7 * s for s in range(n)] if positions is None else positions
    series_uid = series_uid or generate_uid()
    names = list(range(n))
    random.Random(seed).shuffle(names)  # file order and InstanceNumber unrelated to the position
    paths = []
    for s in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = names[s] + 1
        ds.ImageOrientationPatient = list(iop)
        ds.ImagePositionPatient = [positions[s], -20.0, 30.0]
        ds.PixelSpacing = list(pixel_spacing)
        ds.set_pixel_data(vol[s].astype(np.uint16), photometric_interpretation="MONOCHROME2", bits_stored=16)
        path = folder / f"IM{names[s]:04d}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ramp_volume(shape=(4, 6, 5)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape) + 1


def test_series_sorted_by_position_with_spacing_and_affine(tmp_path):
    vol = ramp_volume()
    write_series(tmp_path / "dcm", vol, seed=3)
    out = convert_dicom(tmp_path / "dcm", tmp_path / "out" / "v.nii.gz")
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)
    assert img.header.get_zooms() == pytest.approx((0.7, 0.4, 0.3))
    # Voxel (1, 2, 3) in LPS is (10 - 0.7, -20 + 3 * 0.3, 30 - 2 * 0.4); RAS negates x and y.
    np.testing.assert_allclose(img.affine @ [1, 2, 3, 1], [-9.3, 19.1, 29.2, 1], atol=1e-6)
    loaded, meta = load_volume(out)  # the release loader reads it slices-first, unchanged
    np.testing.assert_array_equal(loaded, vol)
    assert meta.spacing == pytest.approx((0.7, 0.4, 0.3))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v.nii.gz"]


def test_rows_running_superior_are_flipped_to_release_orientation(tmp_path):
    vol = ramp_volume()
    # Columns run up (+z) and rows run anterior (-y): both axes must be flipped.
    write_series(tmp_path / "dcm", vol, iop=[0.0, -1.0, 0.0, 0.0, 0.0, 1.0])
    arr, affine = read_dicom_series(tmp_path / "dcm")
    np.testing.assert_array_equal(arr, vol[:, ::-1, ::-1])
    # Row index now moves toward inferior (-z in RAS too), column index toward posterior (-y in RAS).
    assert affine[2, 1] < 0 and affine[1, 2] < 0
    # A flipped voxel keeps its world position: stored pixel (0, 0) of slice 0 sits at LPS (10, -20, 30).
    p_first_row_col = affine @ [0, vol.shape[1] - 1, vol.shape[2] - 1, 1]
    np.testing.assert_allclose(p_first_row_col[:3], [-10.0, 20.0, 30.0], atol=1e-6)


def test_slices_sorted_by_position_not_file_order(tmp_path):
    vol = ramp_volume((5, 3, 4))
    # Slice s at increasing x = decreasing along the normal (-x): sorted order reverses the stack.
    write_series(tmp_path / "dcm", vol, positions=[10.0 + 0.7 * s for s in range(5)])
    arr, _ = read_dicom_series(tmp_path / "dcm")
    np.testing.assert_array_equal(arr, vol[::-1])


def test_mixed_series_rejected(tmp_path):
    vol = ramp_volume()
    write_series(tmp_path / "dcm", vol[:2], series_uid="1.2.3")
    write_series(tmp_path / "other", vol[2:], positions=[11.4, 12.1], series_uid="1.2.4")
    for p in (tmp_path / "other").iterdir():
        p.rename(tmp_path / "dcm" / f"X{p.name}")
    with pytest.raises(DicomSeriesError, match=r"dcm: mixed series, 2 SeriesInstanceUIDs \['1\.2\.3', '1\.2\.4'\]"):
        read_dicom_series(tmp_path / "dcm")


def test_missing_tag_names_file_and_tag(tmp_path):
    paths = write_series(tmp_path / "dcm", ramp_volume())
    ds = pydicom.dcmread(paths[2])
    del ds.PixelSpacing
    ds.save_as(paths[2])
    with pytest.raises(DicomSeriesError, match=rf"{paths[2].name}: missing DICOM tags \['PixelSpacing'\]"):
        read_dicom_series(tmp_path / "dcm")


def test_non_uniform_spacing_rejected(tmp_path):
    write_series(tmp_path / "dcm", ramp_volume(), positions=[10.0, 10.7, 11.4, 12.8])  # slice at 12.1 missing
    with pytest.raises(DicomSeriesError, match=r"non-uniform slice spacing, gaps from 0\.7000 to 1\.4000 mm"):
        read_dicom_series(tmp_path / "dcm")


def test_inconsistent_orientation_rejected(tmp_path):
    paths = write_series(tmp_path / "dcm", ramp_volume())
    ds = pydicom.dcmread(paths[1])
    ds.ImageOrientationPatient = [0.0, 0.9, 0.1, 0.0, 0.0, -1.0]
    ds.save_as(paths[1])
    with pytest.raises(DicomSeriesError, match=r"ImageOrientationPatient \[.*\] differs from IM\d+'s") as e:
        read_dicom_series(tmp_path / "dcm")
    assert paths[1].name in str(e.value) and "0.9" in str(e.value)


def test_axial_series_rejected(tmp_path):
    write_series(tmp_path / "dcm", ramp_volume(), iop=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    with pytest.raises(DicomSeriesError, match="expected a sagittal series"):
        read_dicom_series(tmp_path / "dcm")


def test_non_dicom_file_named(tmp_path):
    write_series(tmp_path / "dcm", ramp_volume())
    (tmp_path / "dcm" / "notes.txt").write_text("hello")
    with pytest.raises(DicomSeriesError, match=r"notes\.txt: not a readable DICOM file"):
        read_dicom_series(tmp_path / "dcm")


def test_cli_convert_dicom(tmp_path, capsys):
    write_series(tmp_path / "dcm", ramp_volume())
    out = tmp_path / "v.nii.gz"
    assert cli.main(["convert-dicom", str(tmp_path / "dcm"), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert nib.load(str(out)).shape == (4, 6, 5)


def test_duplicate_slice_position_rejected(tmp_path):
    write_series(tmp_path / "dcm", ramp_volume(), positions=[10.0, 9.3, 9.3, 8.6])
    with pytest.raises(DicomSeriesError, match=r"IM\d+ and IM\d+ share a slice position"):
        read_dicom_series(tmp_path / "dcm")


# --- bad input: every case is a DicomSeriesError naming the folder or file, never a pydicom/numpy traceback ---

def test_empty_folder_rejected_and_cli_reports_one_line(tmp_path, capsys):
    (tmp_path / "dcm").mkdir()
    with pytest.raises(DicomSeriesError, match=r"dcm: no files"):
        read_dicom_series(tmp_path / "dcm")
    assert cli.main(["convert-dicom", str(tmp_path / "dcm"), str(tmp_path / "v.nii.gz")]) == 2
    err = capsys.readouterr().err
    assert err == f"reasonknee3d convert-dicom: error: {tmp_path / 'dcm'}: no files\n"
    assert not (tmp_path / "v.nii.gz").exists()


def test_truncated_pixel_data_names_the_file(tmp_path):
    paths = write_series(tmp_path / "dcm", ramp_volume())
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:-10]
    ds.save_as(paths[1])
    with pytest.raises(DicomSeriesError, match=rf"{paths[1].name}: pixel data cannot be decoded \(ValueError: .*less "
                                               rf"than expected \(50 vs 60 bytes\)"):
        convert_dicom(tmp_path / "dcm", tmp_path / "v.nii.gz")


def test_multi_frame_file_rejected(tmp_path):
    paths = write_series(tmp_path / "dcm", ramp_volume())
    ds = pydicom.dcmread(paths[0])
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(paths[0])
    with pytest.raises(DicomSeriesError, match=rf"{paths[0].name}: pixel data has shape \(2, 6, 5\); expected one "
                                               rf"grayscale frame of Rows x Columns = 6 x 5"):
        read_dicom_series(tmp_path / "dcm")


def test_undecodable_compressed_pixel_data_rejected(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    paths = write_series(tmp_path / "dcm", ramp_volume())
    ds = pydicom.dcmread(paths[2])
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"not a jpeg 2000 codestream"])
    ds["PixelData"].VR = "OB"
    ds.save_as(paths[2])
    with pytest.raises(DicomSeriesError, match=rf"{paths[2].name}: pixel data cannot be decoded"):
        read_dicom_series(tmp_path / "dcm")


@pytest.mark.parametrize("tag, vr, raw, expected", [
    ("ImageOrientationPatient", "DS", [0.0, 1.0, 0.0, 0.0, 0.0],
     r"is \[0\.0, 1\.0, 0\.0, 0\.0, 0\.0\]; expected 6 finite numbers"),
    ("ImageOrientationPatient", "DS", [0.0, 1.0, 0.0, 0.0, 1.0, 0.0],
     r"\[0\.0, 1\.0, 0\.0, 0\.0, 1\.0, 0\.0\]; expected two orthogonal unit vectors"),
    ("ImagePositionPatient", "LO", "nan\\0\\0", r"is \[nan, 0\.0, 0\.0\]; expected 3 finite numbers"),
    ("PixelSpacing", "DS", [0.0, 0.0], r"is \[0\.0, 0\.0\]; expected 2 finite positive numbers"),
    ("PixelSpacing", "LO", "abc\\def", r"\['abc', 'def'\] is not 2 finite positive numbers"),
])
def test_malformed_geometry_values_name_file_and_tag(tmp_path, tag, vr, raw, expected):
    paths = write_series(tmp_path / "dcm", ramp_volume())
    ds = pydicom.dcmread(paths[3])
    del ds[tag]
    ds.add_new(tag, vr, raw)
    ds.save_as(paths[3])
    with pytest.raises(DicomSeriesError, match=rf"{paths[3].name}: {tag} {expected}"):
        read_dicom_series(tmp_path / "dcm")
