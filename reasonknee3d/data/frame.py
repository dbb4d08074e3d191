"""The model frame of one volume: how its stored voxel grid maps to the array the model sees, and back.

The model input of a volume is the stored array resized to ``data.input_shape``, mirrored along axis 0 when
``data.canonical_side`` puts the knee into the other side's frame, then (``data.recentre: centroid``) moved by a
whole-voxel ``offset`` that puts its intensity centroid at the grid's centre (vacated voxels hold the array's
minimum, nothing wraps around). ``VolumeFrame`` holds those four facts and carries boxes along:

- ``box_to_model`` / ``box_to_stored``: a box of the stored grid <-> the box of the same region in the model grid
  (what the training augmentation, the grade heads and the segmentation targets use);
- ``text_to_model`` / ``text_to_stored``: the voxel-text boxes of an answer (``<|box_start|>[..]<|box_end|>``).
  Answers keep the stored grid's size (the processor turns them into coordinate tokens relative to it), so in the
  model frame they are mirrored in the stored shape and moved by ``text_offset``, the offset in stored voxels.

Boxes going out are clipped into the target grid; a box that stays inside both grids makes the text round trip
exactly, and the box round trip exactly whenever the resize maps it onto whole voxels (no resize, or an integer
upscale). A frame without mirror and offset is the plain resize, and returns texts unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..boxes import BoxLike, clip_boxes, map_text_boxes, mirror_boxes, scale_boxes, shift_boxes

RECENTRE_MODES = ("centroid",)

Shape = tuple[int, int, int]


def intensity_centroid(volume: np.ndarray) -> np.ndarray:
    """``(3,)`` intensity-weighted mean voxel index of a volume, intensities clipped to [0, 99.5th percentile]."""
    v = np.clip(np.asarray(volume, dtype=np.float64), 0, np.percentile(volume, 99.5))
    total = v.sum()
    if total <= 0:
        raise ValueError("a volume without positive intensities has no centroid")
    return np.array([(np.arange(n) * v.sum(axis=tuple(a for a in range(3) if a != axis))).sum() / total
                     for axis, n in enumerate(v.shape)])


def centring_offset(centroid: Sequence[float], shape: Sequence[int]) -> tuple[int, int, int]:
    """Whole-voxel offset ``round(centre - centroid)`` per axis (``np.round``: halves to even) that moves
    ``centroid`` to within half a voxel of the grid centre ``(n - 1) / 2``."""
    centre = (np.asarray(shape[:3], dtype=np.float64) - 1) / 2
    moved = np.round(centre - np.asarray(centroid, dtype=np.float64))
    return tuple(int(v) for v in moved)  # type: ignore[return-value]


def shift_array(arr: np.ndarray, offset: Sequence[int], fill: Any) -> np.ndarray:
    """``arr`` (..., S, H, W) moved by ``offset`` on its last three axes: ``out[i + offset] = arr[i]``; voxels
    left empty hold ``fill`` (no wrap-around). A zero offset returns ``arr`` itself."""
    if not any(offset):
        return arr
    out = np.full_like(arr, fill)
    lead = arr.ndim - 3
    dst, src = [slice(None)] * lead, [slice(None)] * lead
    for o, n in zip(offset, arr.shape[lead:]):
        o = int(o)
        if abs(o) >= n:  # everything moves out of the grid
            return out
        dst.append(slice(max(o, 0), n + min(o, 0)))
        src.append(slice(max(-o, 0), n - max(o, 0)))
    out[tuple(dst)] = arr[tuple(src)]
    return out


@dataclass(frozen=True)
class VolumeFrame:
    """Stored voxel grid <-> model frame of one volume (see the module docstring)."""

    stored_shape: Shape
    """The loaded volume's ``(S, H, W)``: the grid release boxes and written answers refer to."""
    model_shape: Shape
    """The model input's ``(S, H, W)`` (``data.input_shape``)."""
    mirrored: bool = False
    """Mirrored along axis 0 into ``data.canonical_side``."""
    offset: Shape = (0, 0, 0)
    """Whole model voxels the (resized, mirrored) array was moved by (``data.recentre``)."""

    def __post_init__(self) -> None:
        for name in ("stored_shape", "model_shape", "offset"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"VolumeFrame.{name} needs 3 values, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "mirrored", bool(self.mirrored))

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], mirrored: bool) -> "VolumeFrame":
        """The frame of a volume cache entry (its ``orig_shape``, ``input_shape`` and ``offset``; entries written
        without ``data.recentre`` have no offset)."""
        return cls(tuple(meta["orig_shape"]), tuple(meta["input_shape"]), mirrored,
                   tuple(meta.get("offset", (0, 0, 0))))

    @property
    def text_offset(self) -> Shape:
        """``offset`` in stored voxels (rounded to whole voxels): how answer boxes move in the model frame."""
        scale = np.asarray(self.stored_shape, dtype=np.float64) / np.asarray(self.model_shape, dtype=np.float64)
        return tuple(int(v) for v in np.floor(np.asarray(self.offset) * scale + 0.5))  # type: ignore[return-value]

    @property
    def is_identity_text(self) -> bool:
        """Answers read the same in both frames (no mirror, no offset)."""
        return not self.mirrored and not any(self.text_offset)

    def box_to_model(self, box: BoxLike) -> list[int]:
        """A box of the stored grid -> the box of the same region in the model grid (clipped into it)."""
        b = scale_boxes(box, self.stored_shape, self.model_shape)
        if self.mirrored:
            b = mirror_boxes(b, self.model_shape)
        if any(self.offset):
            b = clip_boxes(shift_boxes(b, self.offset), self.model_shape)
        return [int(v) for v in b]

    def box_to_stored(self, box: BoxLike) -> list[int]:
        """A box of the model grid -> the box of the same region in the stored grid (clipped into it)."""
        b = clip_boxes(shift_boxes(box, [-o for o in self.offset]), self.model_shape)
        if self.mirrored:
            b = mirror_boxes(b, self.model_shape)
        return [int(v) for v in scale_boxes(b, self.model_shape, self.stored_shape)]

    def _text_box_to_model(self, box: BoxLike) -> np.ndarray:
        b = mirror_boxes(box, self.stored_shape) if self.mirrored else np.asarray(box)
        if any(self.text_offset):
            b = clip_boxes(shift_boxes(b, self.text_offset), self.stored_shape)
        return b

    def _text_box_to_stored(self, box: BoxLike) -> np.ndarray:
        b = np.asarray(box)
        if any(self.text_offset):
            b = clip_boxes(shift_boxes(b, [-o for o in self.text_offset]), self.stored_shape)
        return mirror_boxes(b, self.stored_shape) if self.mirrored else b

    def text_to_model(self, text: str) -> str:
        """An answer's voxel-text boxes (stored grid) as the model is trained to write them."""
        return text if self.is_identity_text else map_text_boxes(text, self._text_box_to_model)

    def text_to_stored(self, text: str) -> str:
        """Voxel-text boxes the model wrote -> boxes of the stored grid (what predictions and answers hold)."""
        return text if self.is_identity_text else map_text_boxes(text, self._text_box_to_stored)

    def to_json(self) -> dict[str, Any]:
        return {"stored_shape": list(self.stored_shape), "model_shape": list(self.model_shape),
                "mirrored": self.mirrored, "offset": list(self.offset)}
