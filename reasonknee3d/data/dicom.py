"""One OAI sagittal 3D DESS DICOM series (a folder of single-frame slices) -> int16 NIfTI in release orientation.

Release orientation: array ``(S, H, W)`` with S the sagittal slice index (ordered along the slice normal),
H the image rows running superior -> inferior and W the columns running anterior -> posterior. Slices are
ordered by ``ImagePositionPatient`` projected on the slice normal, never by file name or InstanceNumber
(both are unreliable across exports). The affine is built from ``ImageOrientationPatient``,
``PixelSpacing`` and the measured slice step, converted from DICOM's LPS to NIfTI's RAS world.
"""
from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ..io_utils import atomic_path

_REQUIRED = ("SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
             "Rows", "Columns", "PixelData")
# Tolerances for float noise in scanner geometry: orientation/pixel spacing agreement between slices and
# the smallest slice gap (mm); slice gaps must agree within _GAP_RTOL of their mean.
_TOL = 1e-3
_GAP_RTOL = 0.01
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class DicomSeriesError(ValueError):
    """A DICOM folder that is not one consistent sagittal series; the message names the file and tag."""


def _read_folder(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DicomSeriesError(f"{folder}: no files")
    out = []
    for p in files:
        try:
            ds = pydicom.dcmread(p)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError, IndexError, struct.error,
                NotImplementedError) as e:  # a damaged file trips pydicom's parser in many places
            raise DicomSeriesError(f"{p}: not a readable DICOM file ({e})") from None
        missing = [t for t in _REQUIRED if t not in ds]
        if missing:
            raise DicomSeriesError(f"{p}: missing DICOM tags {missing}")
        _check_values(p, ds)
        out.append((p, ds))
    return out


def _numbers(path: Path, ds: pydicom.Dataset, tag: str, count: int, positive: bool = False) -> np.ndarray:
    """Tag ``tag`` as ``count`` finite floats (> 0 when ``positive``), else DicomSeriesError naming file and tag."""
    what = f"{count} finite {'positive ' if positive else ''}number{'s' if count > 1 else ''}"
    try:
        value: Any = ds[tag].value
        items = [value] if isinstance(value, (str, bytes, int, float)) else list(value)
        arr = np.array([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError, OverflowError, KeyError):
        raise DicomSeriesError(f"{path}: {tag} {ds.get(tag, None)!r} is not {what}") from None
    if arr.shape != (count,) or not np.all(np.isfinite(arr)) or (positive and np.any(arr <= 0)):
        raise DicomSeriesError(f"{path}: {tag} is {arr.tolist()}; expected {what}")
    return arr


def _check_values(path: Path, ds: pydicom.Dataset) -> None:
    """The geometry, size and rescale tags hold usable values (the series checks then compare them)."""
    iop = _numbers(path, ds, "ImageOrientationPatient", 6)
    row_dir, col_dir = iop[:3], iop[3:]
    # Loose bounds: they catch zero, parallel or unscaled vectors; slices that differ slightly from each other
    # are reported by the series check instead.
    if (abs(np.linalg.norm(row_dir) - 1) > 0.1 or abs(np.linalg.norm(col_dir) - 1) > 0.1
            or abs(row_dir @ col_dir) > 0.1):
        raise DicomSeriesError(f"{path}: ImageOrientationPatient {iop.tolist()}; expected two orthogonal unit vectors")
    _numbers(path, ds, "ImagePositionPatient", 3)
    _numbers(path, ds, "PixelSpacing", 2, positive=True)
    for tag in ("Rows", "Columns"):
        _numbers(path, ds, tag, 1, positive=True)
    for tag in ("RescaleSlope", "RescaleIntercept"):
        if ds.get(tag) not in (None, ""):
            _numbers(path, ds, tag, 1)


def _pixels(path: Path, ds: pydicom.Dataset) -> np.ndarray:
    """One slice's stored pixels as ``(Rows, Columns)`` float64, else DicomSeriesError naming the file."""
    try:
        px = ds.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError, IndexError,
            OSError) as e:  # truncated data, a transfer syntax with no decoder installed, bad group 0028 values
        reason = " ".join(str(e).split())
        reason = reason if len(reason) <= 300 else reason[:300] + "..."
        raise DicomSeriesError(f"{path}: pixel data cannot be decoded ({type(e).__name__}: {reason})") from None
    size = (int(ds.Rows), int(ds.Columns))
    if px.shape != size:
        raise DicomSeriesError(f"{path}: pixel data has shape {tuple(px.shape)}; expected one grayscale frame of "
                               f"Rows x Columns = {size[0]} x {size[1]}")
    return px.astype(np.float64)


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Stack a sagittal series into int16 ``(S, H, W)`` in release orientation and its RAS affine."""
    folder = Path(folder)
    slices = _read_folder(folder)
    if len(slices) < 2:
        raise DicomSeriesError(f"{folder}: {len(slices)} slice; a volume needs at least 2 to measure the slice step")

    uids = sorted({str(ds.SeriesInstanceUID) for _, ds in slices})
    if len(uids) > 1:
        raise DicomSeriesError(f"{folder}: mixed series, {len(uids)} SeriesInstanceUIDs {uids}; expected one")

    p0, ds0 = slices[0]
    iop = np.asarray(ds0.ImageOrientationPatient, dtype=np.float64)
    spacing = np.asarray(ds0.PixelSpacing, dtype=np.float64)  # (between rows, between columns)
    size = (int(ds0.Rows), int(ds0.Columns))
    for p, ds in slices[1:]:
        this_iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        if not np.allclose(this_iop, iop, atol=_TOL):
            raise DicomSeriesError(f"{p}: ImageOrientationPatient {this_iop.tolist()} differs from "
                                   f"{p0.name}'s {iop.tolist()}")
        this_spacing = np.asarray(ds.PixelSpacing, dtype=np.float64)
        if not np.allclose(this_spacing, spacing, rtol=_TOL):
            raise DicomSeriesError(f"{p}: PixelSpacing {this_spacing.tolist()} differs from {p0.name}'s "
                                   f"{spacing.tolist()}")
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise DicomSeriesError(f"{p}: {ds.Rows}x{ds.Columns} pixels differ from {p0.name}'s {size[0]}x{size[1]}")

    row_dir, col_dir = iop[:3], iop[3:]  # LPS directions along a row (column index) and down a column (row index)
    normal = np.cross(row_dir, col_dir)
    if int(np.argmax(np.abs(normal))) != 0:
        raise DicomSeriesError(f"{folder}: slice normal {np.round(normal, 3).tolist()} is not left-right; "
                               f"expected a sagittal series")

    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for _, ds in slices])
    order = np.argsort(positions @ normal, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    gaps = np.diff(positions @ normal)
    if np.any(gaps <= _TOL):
        i = int(np.argmax(gaps <= _TOL))
        raise DicomSeriesError(f"{folder}: {slices[i][0].name} and {slices[i + 1][0].name} share a slice position "
                               f"({positions[i].tolist()}); expected one slice per position")
    if np.ptp(gaps) > _GAP_RTOL * gaps.mean():
        raise DicomSeriesError(f"{folder}: non-uniform slice spacing, gaps from {gaps.min():.4f} to "
                               f"{gaps.max():.4f} mm; expected a regular series (a missing slice?)")

    planes = []
    for p, ds in slices:
        px = _pixels(p, ds)  # (Rows, Columns) = (H, W)
        slope, inter = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
        planes.append(px * slope + inter)
    vol = np.stack(planes)  # (S, H, W)
    if vol.min() < np.iinfo(np.int16).min or vol.max() > np.iinfo(np.int16).max:
        raise DicomSeriesError(f"{folder}: intensities {vol.min()}..{vol.max()} do not fit int16")

    # LPS affine of (s, r, c): columns = slice step, row step (down a column), column step (along a row).
    affine = np.eye(4)
    affine[:3, 0] = (positions[-1] - positions[0]) / (len(positions) - 1)
    affine[:3, 1] = col_dir * spacing[0]
    affine[:3, 2] = row_dir * spacing[1]
    affine[:3, 3] = positions[0]
    # Release orientation: rows run toward inferior (-z in LPS), columns toward posterior (+y in LPS).
    for axis, lps_axis, want_sign in ((1, 2, -1.0), (2, 1, 1.0)):
        if np.sign(affine[lps_axis, axis]) == -want_sign:
            vol = np.flip(vol, axis=axis)
            affine[:3, 3] += affine[:3, axis] * (vol.shape[axis] - 1)
            affine[:3, axis] *= -1
    return np.ascontiguousarray(np.round(vol).astype(np.int16)), _LPS_TO_RAS @ affine


def convert_dicom(dicom_dir: str | Path, out_path: str | Path) -> Path:
    """Write the series in ``dicom_dir`` as an int16 NIfTI at ``out_path`` (atomically); returns the path."""
    out_path = Path(out_path)
    if not out_path.name.endswith((".nii.gz", ".nii")):
        raise ValueError(f"output {out_path} must end in .nii.gz or .nii")
    vol, affine = read_dicom_series(dicom_dir)
    img = nib.Nifti1Image(vol, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)  # 1 = scanner coordinates
    img.set_sform(affine, code=1)
    with atomic_path(out_path) as tmp:
        nib.save(img, str(tmp))
    return out_path
