"""Mask cache: each release mask at model-input size, stored once, for the segmentation pretraining stage.

A mask becomes the model's target exactly as its volume becomes the model's input (``VolumeCache``): loaded
in the volume's ``(S, H, W)`` orientation (``io.load_mask``, transposed like the image), resized to
``cfg.input_shape`` with MONAI's ``Resize(mode="nearest-exact")`` (what ``transforms.build_preprocess(cfg,
with_mask=True)`` does, so every voxel keeps a label that was there and no label is invented), and mirrored along
axis 0 when ``cfg.mirrors(image_path)`` mirrors the volume into ``data.canonical_side``, and with ``data.recentre``
moved by the volume's whole-voxel offset (vacated voxels 0), so mask and volume stay aligned.

An entry is ``<volume_id>-<key>.npy`` (uint8 ``(S, H, W)``) plus ``.json`` metadata (the mask and image files,
the loaded shape, whether it is mirrored, the largest label of the stored mask and the labels left at input
size). The key hashes the settings that change the array (``input_shape``, ``canonical_side``, ``recentre`` when
set) and the identity (resolved path, size, mtime) of the mask file and of its image file (whose header decides
the axis order and whose name the knee side), so a changed setting or file gives a new entry instead of a stale
one. Both files are written atomically, the ``.json`` last: an entry exists exactly when its ``.json`` does. The
cache lives next to the volume cache, in ``<cache root>/masks``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from ..io_utils import atomic_open, write_json
from .cache import CacheMiss
from .io import inspect_volume, load_mask
from .release import volume_id_of
from .frame import shift_array
from .transforms import PreprocessConfig, preprocess_volume_frame

if TYPE_CHECKING:
    import torch

# Bump when the code changes the arrays it writes for the same settings and files.
MASK_CACHE_VERSION = 1
MASK_SETTINGS = ("input_shape", "canonical_side", "recentre")
"""The ``PreprocessConfig`` fields that change a cached mask (intensity settings do not)."""


def preprocess_mask(image_path: str | Path, mask_path: str | Path, cfg: PreprocessConfig,
                    offset: Optional[Sequence[int]] = None) -> tuple[np.ndarray, tuple[int, int, int], int]:
    """One mask at model-input size as uint8 ``(S, H, W)``, the volume's loaded shape, and the stored mask's
    largest label. Mirrored along axis 0 exactly when the volume's cache entry is, and with ``cfg.recentre`` moved
    by the volume's offset (``offset``, e.g. from its volume cache entry; unset: computed from the volume) with 0
    in the vacated voxels. ``VolumeError`` for a missing, unreadable or mismatched mask (the message names the
    file)."""
    from monai.transforms import Resize

    meta = inspect_volume(image_path)
    mask = load_mask(mask_path, meta)  # uint8, transposed like the image
    max_label = int(mask.max()) if mask.size else 0
    resized = Resize(cfg.input_shape, mode="nearest-exact")(mask[None])
    arr = resized.numpy() if hasattr(resized, "numpy") else np.asarray(resized)
    arr = np.asarray(arr[0]).astype(np.uint8)  # nearest-exact copies labels: the cast is exact
    if cfg.mirrors(image_path):
        arr = arr[::-1]
    arr = np.ascontiguousarray(arr)
    if cfg.recentre is not None:
        if offset is None:
            offset = preprocess_volume_frame(image_path, cfg)[1].offset
        arr = shift_array(arr, offset, 0)
    return arr, tuple(meta.shape), max_label


class MaskCache:
    """Model-input-size masks of one ``PreprocessConfig`` under ``cache_dir`` (see the module docstring)."""

    def __init__(self, cache_dir: str | Path, cfg: PreprocessConfig) -> None:
        self.dir = Path(cache_dir)
        self.cfg = cfg
        self._meta: dict[Path, dict[str, Any]] = {}

    def settings(self) -> dict[str, Any]:
        """The settings that determine a cached mask (JSON-serializable)."""
        out = {"input_shape": list(self.cfg.input_shape), "canonical_side": self.cfg.canonical_side}
        if self.cfg.recentre is not None:  # left out when unset, so existing entries keep their keys
            out["recentre"] = self.cfg.recentre
        return out

    def key(self, image_path: str | Path, mask_path: str | Path) -> str:
        """Hash of the mask settings and the identity (resolved path, size, mtime) of the mask and image files."""
        ident: dict[str, Any] = {"version": MASK_CACHE_VERSION, "settings": self.settings()}
        for name, path in (("mask", mask_path), ("image", image_path)):
            src = Path(path).resolve()
            try:
                st = src.stat()
            except OSError as e:
                raise CacheMiss(f"{src}: {name} file not found ({e.strerror}); the mask cache key needs its size "
                                f"and mtime") from None
            ident[name] = {"path": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def paths(self, image_path: str | Path, mask_path: str | Path) -> tuple[Path, Path]:
        """(array, metadata) file paths of a mask's entry."""
        stem = f"{volume_id_of(image_path)}-{self.key(image_path, mask_path)}"
        return self.dir / f"{stem}.npy", self.dir / f"{stem}.json"

    def has(self, image_path: str | Path, mask_path: str | Path) -> bool:
        return self.paths(image_path, mask_path)[1].is_file()

    def put(self, image_path: str | Path, mask_path: str | Path,
            offset: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """Preprocess one mask and write its entry (array first, metadata last); returns the metadata.
        ``offset``: the volume's ``data.recentre`` offset when known (``preprocess_mask``)."""
        arr_path, meta_path = self.paths(image_path, mask_path)
        if self.cfg.recentre is not None and offset is None:
            offset = preprocess_volume_frame(image_path, self.cfg)[1].offset
        arr, orig_shape, max_label = preprocess_mask(image_path, mask_path, self.cfg, offset)
        meta = {"mask": str(Path(mask_path).resolve()), "image": str(Path(image_path).resolve()),
                "orig_shape": list(orig_shape), "input_shape": list(arr.shape),
                "mirrored": self.cfg.mirrors(image_path), "max_label": max_label,
                "labels": [int(v) for v in np.unique(arr)], "settings": self.settings(),
                "version": MASK_CACHE_VERSION}
        if self.cfg.recentre is not None:
            meta["offset"] = [int(v) for v in offset]  # type: ignore[union-attr]
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_open(arr_path, "wb") as fh:
            np.save(fh, arr)
        try:
            write_json(meta_path, meta, indent=None)
        except BaseException:
            arr_path.unlink(missing_ok=True)  # an array without metadata is not an entry
            raise
        self._meta[meta_path] = meta
        return meta

    def meta(self, image_path: str | Path, mask_path: str | Path) -> dict[str, Any]:
        """An entry's metadata; ``CacheMiss`` if the mask is not cached under these settings."""
        return self._read_meta(self.paths(image_path, mask_path)[1], mask_path)

    def _read_meta(self, meta_path: Path, mask_path: str | Path) -> dict[str, Any]:
        meta = self._meta.get(meta_path)
        if meta is None:
            if not meta_path.is_file():
                raise CacheMiss(f"{mask_path}: not in the mask cache {self.dir} for settings {self.settings()}")
            meta = self._meta[meta_path] = json.loads(meta_path.read_text(encoding="utf-8"))
        return meta

    def ensure(self, image_path: str | Path, mask_path: str | Path,
               offset: Optional[Sequence[int]] = None) -> dict[str, Any]:
        """The entry's metadata, writing the entry first if it is missing (``offset`` as in ``put``)."""
        if self.has(image_path, mask_path):
            return self.meta(image_path, mask_path)
        return self.put(image_path, mask_path, offset)

    def load(self, image_path: str | Path, mask_path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Memory-mapped uint8 ``(S, H, W)`` array and metadata; ``CacheMiss`` if not cached."""
        arr_path, meta_path = self.paths(image_path, mask_path)
        meta = self._read_meta(meta_path, mask_path)
        return np.load(arr_path, mmap_mode="r"), meta

    def read_tensor(self, image_path: str | Path, mask_path: str | Path) -> tuple["torch.Tensor", dict[str, Any]]:
        """One mask as an in-memory ``(1, S, H, W)`` uint8 tensor and its metadata."""
        import torch

        arr, meta = self.load(image_path, mask_path)
        return torch.from_numpy(np.array(arr))[None], meta
