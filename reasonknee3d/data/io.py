"""Reading release volumes and masks into the package's ``(S, H, W)`` array convention, with validation.

Every NIfTI the package reads goes through ``load_volume`` / ``load_mask``, so a bad file fails here, once,
with an error that names the file and the problem (``VolumeError``). The release stores the 160 sagittal
slices on array axis 0; some conversions put them on the last axis, and the published code then transposes
``(2, 0, 1)``. We decide from the voxel spacing (the ~0.7 mm axis is the slice axis; in-plane is ~0.365 mm)
and fall back on the shape (the axis with the fewest voxels) when the header spacing is uninformative.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

# The slice axis must be this much coarser than the in-plane axes to be recognized from the spacing
# (0.7 / 0.365 = 1.9 on OAI DESS); below it the header is treated as uninformative.
_SLICE_SPACING_RATIO = 1.25

# Limits checked on the header before any voxel data is read, so a corrupt or hostile header fails in
# microseconds instead of allocating what it claims (OAI DESS is 160 x 384 x 384 int16, 47 MB):
MAX_VOXELS = 2 ** 31
"""Most voxels a volume may declare."""
MAX_COMPRESSED_DATA_BYTES = 4 * 2 ** 30
"""Most voxel-data bytes a compressed file (.nii.gz, .bz2, .zst) may declare; only decompression would
tell whether they are there."""
# DEFLATE expands at most ~1032:1 (a 258-byte match in 2 bits); a gzip file declaring more voxel data than
# its size times this cannot hold it. A little slack for the gzip framing.
_DEFLATE_MAX_RATIO = 1040

# Array axis orders (which stored axis becomes S, H, W) the release can hold.
SLICES_FIRST = (0, 1, 2)
SLICES_LAST = (2, 0, 1)


class VolumeError(ValueError):
    """A volume or mask file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class VolumeMeta:
    path: Path
    """Resolved file the array came from."""
    shape: tuple[int, int, int]
    """Shape of the loaded ``(S, H, W)`` array."""
    spacing: tuple[float, float, float]
    """Voxel size in mm along the loaded axes (S, H, W)."""
    affine: np.ndarray
    """4x4 voxel-to-world (RAS mm) matrix of the loaded array (columns permuted with the axes)."""
    axis_order: tuple[int, int, int]
    """Stored array axes that became (S, H, W): ``SLICES_FIRST`` or ``SLICES_LAST``."""
    stored_shape: tuple[int, ...]
    """Shape of the array as stored in the file."""


def _open(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise VolumeError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as e:
        raise VolumeError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if len(img.shape) != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got a {len(img.shape)}D array of shape {img.shape}")
    check_declared_size(path, img)
    return img


def check_declared_size(path: Path, img: nib.Nifti1Image) -> int:
    """Check the voxel data the header declares against the file before anything is read; returns its bytes.

    Raises ``VolumeError`` (naming ``path`` and the declared shape) for an empty axis, more than
    ``MAX_VOXELS`` voxels, an uncompressed file shorter than its data offset plus the declared data, or a
    compressed file declaring more than ``MAX_COMPRESSED_DATA_BYTES`` (gzip: more than it could expand to).
    """
    shape = tuple(int(n) for n in img.shape)
    dtype = np.dtype(img.header.get_data_dtype())
    if min(shape, default=0) < 1:
        raise VolumeError(f"{path}: header declares shape {shape}; expected at least 1 voxel along every axis")
    n_voxels = int(np.prod(shape, dtype=object))
    if n_voxels > MAX_VOXELS:
        raise VolumeError(f"{path}: header declares shape {shape}, {n_voxels} voxels; expected at most "
                          f"{MAX_VOXELS} (2^31) voxels (corrupt header?)")
    declared = n_voxels * dtype.itemsize
    image_file = img.file_map["image"].filename if "image" in img.file_map else None
    if image_file is None:  # an in-memory image: nothing on disk to compare with
        return declared
    image_file = Path(image_file)
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    what = f"header declares shape {shape} of {dtype} = {declared} bytes of voxel data"
    try:
        file_size = image_file.stat().st_size
    except OSError as e:
        raise VolumeError(f"{path}: voxel data file {image_file} cannot be read ({e})") from None
    suffix = image_file.suffix.lower()
    if suffix in (".gz", ".bz2", ".zst"):
        if declared > MAX_COMPRESSED_DATA_BYTES:
            raise VolumeError(f"{path}: {what}; expected at most {MAX_COMPRESSED_DATA_BYTES} bytes in a "
                              f"compressed volume (corrupt header?)")
        if suffix == ".gz" and offset + declared > file_size * _DEFLATE_MAX_RATIO:
            least = -(-(offset + declared) // _DEFLATE_MAX_RATIO)
            raise VolumeError(f"{path}: {what}, more than a {file_size}-byte gzip file can expand to "
                              f"({_DEFLATE_MAX_RATIO}x); expected a file of at least {least} bytes "
                              f"(truncated file or corrupt header?)")
    elif offset + declared > file_size:
        raise VolumeError(f"{path}: {what} from byte {offset}, but {image_file.name} has {file_size} bytes; "
                          f"expected at least {offset + declared} (truncated file or corrupt header?)")
    return declared


def slice_axis_order(shape: tuple[int, ...], spacing: tuple[float, ...], path: Path | str = "") -> tuple[int, int, int]:
    """Which stored axes become (S, H, W): from the coarsest-spacing axis, else the axis with fewest voxels."""
    sp = np.asarray(spacing[:3], dtype=np.float64)
    coarse = int(np.argmax(sp))
    others = np.delete(sp, coarse)
    if np.all(sp > 0) and sp[coarse] >= _SLICE_SPACING_RATIO * others.max():
        axis = coarse
    else:
        # Header spacing is isotropic or missing: the slice axis is the short one (160 vs 384 on OAI).
        sizes = np.asarray(shape[:3])
        axis = int(np.argmin(sizes)) if np.sum(sizes == sizes.min()) == 1 else 0
    if axis == 0:
        return SLICES_FIRST
    if axis == 2:
        return SLICES_LAST
    raise VolumeError(f"{path}: the slice axis looks like array axis 1 (shape {tuple(shape)}, spacing "
                      f"{tuple(round(float(s), 4) for s in sp)}); expected slices on axis 0 or on the last axis")


def inspect_volume(path: str | Path) -> VolumeMeta:
    """Header-only metadata of a volume (no voxel data is read)."""
    path = Path(path).resolve()
    img = _open(path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    order = slice_axis_order(img.shape, zooms, path)
    affine = np.asarray(img.affine, dtype=np.float64).copy()
    # World position of voxel (i, j, k) of the loaded array = stored voxel permuted back, so the affine's
    # first three columns permute like the axes.
    affine[:, :3] = affine[:, list(order)]
    return VolumeMeta(path=path, shape=tuple(int(img.shape[a]) for a in order),  # type: ignore[arg-type]
                      spacing=tuple(zooms[a] for a in order),  # type: ignore[arg-type]
                      affine=affine, axis_order=order, stored_shape=tuple(int(s) for s in img.shape))


def _read(path: Path) -> np.ndarray:
    img = _open(path)
    try:
        # dataobj applies the header's scl_slope/inter and keeps integer data integer (get_fdata is float64).
        return np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise VolumeError(f"{path}: voxel data cannot be read, the file is truncated or corrupt "
                          f"({type(e).__name__}: {e})") from None


def load_volume(path: str | Path) -> tuple[np.ndarray, VolumeMeta]:
    """Load an image as float32 ``(S, H, W)`` plus its metadata, rejecting unusable volumes.

    Raises ``VolumeError`` for a missing/corrupt/truncated file, a non-3D array, NaN/Inf voxels or a
    constant volume (nothing to see, and intensity normalization would divide by zero).
    """
    meta = inspect_volume(path)
    arr = _read(meta.path)
    if arr.dtype.kind not in "iuf":
        raise VolumeError(f"{meta.path}: voxel type {arr.dtype} is not numeric; expected an int or float image")
    vol = np.ascontiguousarray(arr.transpose(meta.axis_order), dtype=np.float32)
    if arr.dtype.kind == "f":  # integer voxels cannot be NaN/Inf
        bad = ~np.isfinite(vol)
        if bad.any():
            raise VolumeError(f"{meta.path}: {int(bad.sum())} NaN/Inf voxels (first at "
                              f"{np.argwhere(bad)[0].tolist()}); expected finite intensities")
    lo, hi = float(vol.min()), float(vol.max())
    if lo == hi:
        raise VolumeError(f"{meta.path}: constant volume (every voxel is {lo}); expected an MRI with contrast")
    return vol, meta


def load_mask(path: str | Path, image: VolumeMeta) -> np.ndarray:
    """Load a label mask as uint8 ``(S, H, W)``, transposed exactly like its ``image``.

    The mask must have the image's stored shape and integer labels in 0..255.
    """
    path = Path(path).resolve()
    arr = _read(path)
    if tuple(arr.shape) != image.stored_shape:
        raise VolumeError(f"{path}: mask shape {tuple(arr.shape)} differs from its volume {image.path} "
                          f"of shape {image.stored_shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise VolumeError(f"{path}: mask has non-integer labels; expected integer label ids")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise VolumeError(f"{path}: mask labels span {arr.min()}..{arr.max()}; expected ids in 0..255")
    return np.ascontiguousarray(arr.transpose(image.axis_order), dtype=np.uint8)

