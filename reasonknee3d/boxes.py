"""The one 3D box convention of the package, and everything that converts or compares boxes.

A box is six inclusive voxel indices in the seed order
``[start_slice, end_slice, x_min, x_max, y_min, y_max] = [a0_min, a0_max, a1_min, a1_max, a2_min, a2_max]``
over the loaded array ``(S, H, W)``. Its volume is the product of ``max - min + 1`` per axis.

Functions take one box (a length-6 sequence) or many (an ``(N, 6)`` array) and broadcast like numpy.
MONAI's box utilities use half-open corner boxes ``[a0, a1, a2, b0, b1, b2]`` (``StandardMode`` xyzxyz);
``to_corners`` / ``from_corners`` convert between the two.
"""
from __future__ import annotations

import re
from typing import Callable, Optional, Sequence

import numpy as np

from .constants import BOX_END, BOX_START, COORD_TOKEN_FORMAT

BoxLike = Sequence[int] | np.ndarray

_MINS = np.array([0, 2, 4])
_MAXS = np.array([1, 3, 5])


def as_boxes(boxes: BoxLike) -> np.ndarray:
    """``(..., 6)`` int64 array; raises ``ValueError`` naming the value if the last axis is not 6."""
    arr = np.asarray(boxes)
    if arr.ndim == 0 or arr.shape[-1] != 6:
        raise ValueError(f"a box has 6 values [a0_min, a0_max, a1_min, a1_max, a2_min, a2_max]; got shape "
                         f"{arr.shape} from {boxes!r:.80}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"box values must be numbers, got dtype {arr.dtype} from {boxes!r:.80}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"box values must be finite, got {boxes!r:.80}")
        arr = np.floor(arr + 0.5)
    return arr.astype(np.int64)


def validate_box(box: BoxLike, shape: Optional[Sequence[int]] = None) -> list[int]:
    """Check one box (min <= max per axis, inside ``shape`` if given) and return it as a list of ints."""
    b = as_boxes(box)
    if b.ndim != 1:
        raise ValueError(f"expected one box of 6 values, got shape {b.shape}")
    mins, maxs = b[_MINS], b[_MAXS]
    if np.any(mins > maxs):
        raise ValueError(f"box {b.tolist()} has min > max on axis {int(np.argmax(mins > maxs))}")
    if np.any(mins < 0):
        raise ValueError(f"box {b.tolist()} has a negative index")
    if shape is not None:
        lim = np.asarray(shape[:3])
        if np.any(maxs >= lim):
            raise ValueError(f"box {b.tolist()} does not fit a volume of shape {tuple(int(s) for s in shape)}")
    return [int(v) for v in b]


def repair_boxes(boxes: BoxLike) -> tuple[np.ndarray, np.ndarray]:
    """Swap min/max where reversed. Returns (boxes, repaired) with ``repaired`` True per changed box."""
    b = as_boxes(boxes).copy()
    lo, hi = b[..., _MINS], b[..., _MAXS]
    swapped = lo > hi
    b[..., _MINS] = np.minimum(lo, hi)
    b[..., _MAXS] = np.maximum(lo, hi)
    return b, swapped.any(axis=-1)


def box_volume(boxes: BoxLike) -> np.ndarray:
    """Number of voxels in each box (0 for an empty/reversed box)."""
    b = as_boxes(boxes)
    ext = np.clip(b[..., _MAXS] - b[..., _MINS] + 1, 0, None)
    return ext.prod(axis=-1)


def intersection_volume(a: BoxLike, b: BoxLike) -> np.ndarray:
    """Voxels shared by boxes ``a`` and ``b`` (broadcast elementwise)."""
    a, b = as_boxes(a), as_boxes(b)
    lo = np.maximum(a[..., _MINS], b[..., _MINS])
    hi = np.minimum(a[..., _MAXS], b[..., _MAXS])
    return np.clip(hi - lo + 1, 0, None).prod(axis=-1)


def iou_3d(a: BoxLike, b: BoxLike) -> np.ndarray | float:
    """3D IoU = intersection / (vol_a + vol_b - intersection), elementwise with numpy broadcasting.

    Returns a float for two single boxes and an array otherwise.
    """
    a, b = as_boxes(a), as_boxes(b)
    inter = intersection_volume(a, b).astype(np.float64)
    union = box_volume(a) + box_volume(b) - inter
    out = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return float(out) if out.ndim == 0 else out


def clip_boxes(boxes: BoxLike, shape: Sequence[int]) -> np.ndarray:
    """Clip boxes into a volume of ``shape`` (first three entries used)."""
    b = as_boxes(boxes).copy()
    lim = np.repeat(np.asarray(shape[:3], dtype=np.int64) - 1, 2)
    return np.clip(b, 0, lim)


def box_from_mask(mask: np.ndarray, labels: Optional[Sequence[int]] = None) -> Optional[list[int]]:
    """Tight box around the non-zero voxels of ``mask`` (or voxels whose label is in ``labels``).

    Returns None when no voxel matches. Uses per-axis projections, so it costs three reductions.
    """
    if mask.ndim != 3:
        raise ValueError(f"box_from_mask expects a 3D mask (S, H, W), got shape {mask.shape}")
    sel = mask != 0 if labels is None else np.isin(mask, np.asarray(list(labels)))
    out: list[int] = []
    for axis in range(3):
        other = tuple(i for i in range(3) if i != axis)
        idx = np.flatnonzero(sel.any(axis=other))
        if idx.size == 0:
            return None
        out += [int(idx[0]), int(idx[-1])]
    return out


def box_center(boxes: BoxLike) -> np.ndarray:
    """Centre voxel (rounded down) of each box, shape ``(..., 3)``."""
    b = as_boxes(boxes)
    return (b[..., _MINS] + b[..., _MAXS]) // 2


# --- MONAI interop ----------------------------------------------------------------------------------

def to_corners(boxes: BoxLike) -> np.ndarray:
    """Inclusive voxel boxes -> MONAI half-open corner boxes ``[a0, a1, a2, b0, b1, b2]`` (float)."""
    b = as_boxes(boxes)
    return np.concatenate([b[..., _MINS], b[..., _MAXS] + 1], axis=-1).astype(np.float64)


def from_corners(corners: np.ndarray) -> np.ndarray:
    """MONAI half-open corner boxes -> inclusive voxel boxes (rounded to the nearest voxel edge)."""
    c = np.asarray(corners, dtype=np.float64)
    lo = np.floor(c[..., :3] + 0.5).astype(np.int64)
    hi = np.floor(c[..., 3:] + 0.5).astype(np.int64) - 1
    hi = np.maximum(hi, lo)
    out = np.empty(c.shape[:-1] + (6,), dtype=np.int64)
    out[..., _MINS], out[..., _MAXS] = lo, hi
    return out


def scale_boxes(boxes: BoxLike, src_shape: Sequence[int], dst_shape: Sequence[int]) -> np.ndarray:
    """Map boxes from a volume of ``src_shape`` to the same region of a resized volume of ``dst_shape``."""
    c = to_corners(boxes)
    f = np.asarray(dst_shape[:3], dtype=np.float64) / np.asarray(src_shape[:3], dtype=np.float64)
    c = c * np.concatenate([f, f])
    return clip_boxes(from_corners(c), dst_shape)


def mirror_boxes(boxes: BoxLike, shape: Sequence[int]) -> np.ndarray:
    """Boxes of a volume mirrored along array axis 0 (the sagittal slice axis) of ``shape``.

    Index i becomes ``S - 1 - i``; min and max trade places, so a valid box stays valid (and a reversed one
    stays reversed). Mirroring twice gives the input back.
    """
    b = as_boxes(boxes).copy()
    last = int(shape[0]) - 1
    b[..., 0], b[..., 1] = last - b[..., 1], last - b[..., 0]
    return b


_VOXEL_BOX_RE = re.compile(re.escape(BOX_START) + r"\s*\[([^\]]*)\]\s*" + re.escape(BOX_END))


def shift_boxes(boxes: BoxLike, offset: Sequence[int]) -> np.ndarray:
    """Boxes moved by the whole-voxel ``offset`` (one per array axis): index i on axis a becomes ``i + offset[a]``."""
    b = as_boxes(boxes).copy()
    b += np.repeat(np.asarray(offset, dtype=np.int64), 2)
    return b


def map_text_boxes(text: str, fn: Callable[[list[int]], Sequence[int]]) -> str:
    """``text`` with every voxel-text box ``<|box_start|>[..]<|box_end|>`` replaced by ``fn(box)``; a span that is
    not six integers is left as it is, for the scorer to judge."""
    def repl(m: re.Match) -> str:
        try:
            vals = [int(v) for v in m.group(1).split(",")]
        except ValueError:
            return m.group(0)
        if len(vals) != 6:
            return m.group(0)
        return f"{BOX_START}{[int(v) for v in fn(vals)]}{BOX_END}"
    return _VOXEL_BOX_RE.sub(repl, text)


def mirror_text_boxes(text: str, shape: Sequence[int]) -> str:
    """``text`` with every voxel-text box ``<|box_start|>[..]<|box_end|>`` mirrored along axis 0 of ``shape``.

    Maps answers into a side-canonical frame and predictions back (``data.transforms`` ``canonical_side``);
    a span that is not six integers is left as it is, for the scorer to judge.
    """
    return map_text_boxes(text, lambda vals: mirror_boxes(vals, shape))


# --- quantization to K bins per axis ----------------------------------------------------------------

def quantize_boxes(boxes: BoxLike, shape: Sequence[int], num_bins: int) -> np.ndarray:
    """Voxel index -> bin in ``[0, num_bins)`` relative to each axis length (voxel centres are binned).

    With ``num_bins >= axis length`` every voxel has its own bin and the round trip is exact.
    """
    b = as_boxes(boxes).astype(np.float64)
    lengths = np.repeat(np.asarray(shape[:3], dtype=np.float64), 2)
    bins = np.floor((b + 0.5) * num_bins / lengths)
    return np.clip(bins, 0, num_bins - 1).astype(np.int64)


def dequantize_boxes(bins: BoxLike, shape: Sequence[int], num_bins: int) -> np.ndarray:
    """Bin -> voxel index at the bin centre, clipped into the volume; min <= max is kept."""
    q = np.asarray(bins, dtype=np.float64)
    lengths = np.repeat(np.asarray(shape[:3], dtype=np.float64), 2)
    v = np.floor((q + 0.5) * lengths / num_bins).astype(np.int64)
    return clip_boxes(v, shape)


# --- text forms ---------------------------------------------------------------------------------------

def box_to_text(box: BoxLike) -> str:
    """Voxel box as the answer text: ``<|box_start|>[a, b, c, d, e, f]<|box_end|>``."""
    return f"{BOX_START}{validate_box(box)}{BOX_END}"


def box_to_coord_tokens(box: BoxLike, shape: Sequence[int], num_bins: int) -> str:
    """Voxel box -> ``<|box_start|>`` + six coordinate tokens + ``<|box_end|>`` for a volume of ``shape``."""
    bins = quantize_boxes(validate_box(box), shape, num_bins)
    return BOX_START + "".join(COORD_TOKEN_FORMAT.format(int(k)) for k in bins) + BOX_END


_COORD_RE = re.compile(re.escape(COORD_TOKEN_FORMAT).replace(r"\{\}", r"(\d+)"))
_COORD_SPAN_RE = re.compile(re.escape(BOX_START) + r"((?:" + _COORD_RE.pattern + r"){6})" + re.escape(BOX_END))


def coord_tokens_to_text(text: str, shape: Sequence[int], num_bins: int) -> str:
    """Replace every coordinate-token box in ``text`` by its voxel text form (``box_to_text``).

    Used when decoding model output: the scorer sees voxel indices of the original volume. Unconstrained
    generation can emit a box with min > max on an axis; it is written as generated (the scorer repairs and
    counts it) rather than raising and losing the whole batch.
    """
    def repl(m: re.Match) -> str:
        bins = [int(x) for x in _COORD_RE.findall(m.group(1))]
        return f"{BOX_START}{[int(v) for v in dequantize_boxes(bins, shape, num_bins)]}{BOX_END}"
    return _COORD_SPAN_RE.sub(repl, text)


def voxel_text_to_coord_tokens(text: str, shape: Sequence[int], num_bins: int) -> str:
    """Replace every voxel-text box in ``text`` by coordinate tokens (training targets)."""
    def repl(m: re.Match) -> str:
        vals = [int(float(v)) for v in m.group(1).split(",")]
        return box_to_coord_tokens(vals, shape, num_bins)
    return _VOXEL_BOX_RE.sub(repl, text)


# --- the release's written box order ----------------------------------------------------------------

RELEASE_BOX_AXES: tuple[int, int, int] = (0, 1, 2)
"""Array axis of the loaded ``(S, H, W)`` volume indexed by each pair of a box written in a release item or
answer, ``[start_slice, end_slice, x_min, x_max, y_min, y_max]``: start/end slice -> axis 0 (the sagittal
slice index), x -> axis 1 (H, rows), y -> axis 2 (W, columns).

The slice pair is axis 0 in the upstream code (it reads ``volume[i, :, :]`` as slice ``i``). The upstream
repository has no code that writes or reads a box, so x/y cannot be settled from it. The list puts the slice
(array axis 0) first, which reads as per-array-axis order (what ``np.nonzero`` on a mask gives), so x is
taken as axis 1 and y as axis 2. The package's own box uses that order too, so today the conversion is the
identity. ``reasonknee3d check-release`` compares the release's written boxes with the boxes of its masks,
as written and with x/y swapped; if the swapped reading agrees better on the real release, change this
constant to ``(0, 2, 1)`` and nothing else."""


def _check_axes(axes: Sequence[int]) -> tuple[int, int, int]:
    t = tuple(int(a) for a in axes)
    if sorted(t) != [0, 1, 2]:
        raise ValueError(f"box axes {tuple(axes)!r}: expected a permutation of (0, 1, 2)")
    return t  # type: ignore[return-value]


def release_box_to_package(box: Sequence[int], axes: Sequence[int] = RELEASE_BOX_AXES) -> list[int]:
    """A box as written in the release (``[start_slice, end_slice, x_min, x_max, y_min, y_max]``) -> the
    package's ``[a0_min, a0_max, a1_min, a1_max, a2_min, a2_max]``; pair ``k`` goes to array axis ``axes[k]``."""
    axes = _check_axes(axes)
    if len(box) != 6:
        raise ValueError(f"a release box has 6 values, got {len(box)}: {list(box)!r:.80}")
    out = [0] * 6
    for k, a in enumerate(axes):
        out[2 * a], out[2 * a + 1] = box[2 * k], box[2 * k + 1]
    return out


def package_box_to_release(box: Sequence[int], axes: Sequence[int] = RELEASE_BOX_AXES) -> list[int]:
    """Inverse of ``release_box_to_package``: the package's box -> the release's written order."""
    axes = _check_axes(axes)
    if len(box) != 6:
        raise ValueError(f"a box has 6 values, got {len(box)}: {list(box)!r:.80}")
    return [v for a in axes for v in (box[2 * a], box[2 * a + 1])]
