"""The slice baseline's vision-feature cache: the frozen vision tower runs once per volume.

Fine-tuning follows the paper: the vision tower is frozen, so ``preprocess_slice_features`` runs it once per
volume and ``SliceFeatureCache`` keeps its output (safetensors, keyed by the vision weights, the frame
settings and the source file). Training feeds cached features to the language model through
``mm_encoder_outputs``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ...io_utils import atomic_path
from .configuration_slice import FEATURE_CACHE_VERSION, SliceBaselineConfig
from .processing_slice import encode_frames

# --- vision-feature cache ----------------------------------------------------------------------------

def base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_fingerprint(model: Any) -> str:
    """Hash of the vision tower's weights (names, dtypes, shapes, bytes); computed once per model object.

    Two folders holding the same vision weights (a base checkpoint and a slice model made from it) share
    cache entries; any change to the tower gives new ones.
    """
    base = base_model(model)
    cached = getattr(base, "_reasonknee3d_vision_fp", None)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(base.model.visual.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    base._reasonknee3d_vision_fp = h.hexdigest()
    return base._reasonknee3d_vision_fp


@dataclass(frozen=True)
class CachedFeatures:
    """Vision-tower output of one volume, ready for ``mm_encoder_outputs``."""

    features: torch.Tensor
    """(N, C) merged patch features, N = video_token_count(grid_thw)."""
    grid_thw: torch.Tensor
    """(3,) video grid (t, h, w) in patches."""
    volume_shape: tuple[int, int, int]
    """Shape (S, H, W) of the loaded source volume (boxes are quantized relative to it)."""


class SliceFeatureCache:
    """Vision features per volume under ``cache_dir``, one safetensors file each.

    A file is ``<volume_id>-<key>.safetensors``; the key hashes the vision weights (``vision_fingerprint``),
    the frame settings, the cache version and the source file's resolved path, size and mtime, so a
    change to any of them misses instead of reading stale features.
    """

    def __init__(self, cache_dir: str | os.PathLike, vision_id: str, cfg: SliceBaselineConfig) -> None:
        self.dir = Path(cache_dir)
        self.vision_id = vision_id
        self.cfg = cfg

    @classmethod
    def for_model(cls, cache_dir: str | os.PathLike, model: Any, cfg: SliceBaselineConfig) -> "SliceFeatureCache":
        return cls(cache_dir, vision_fingerprint(model), cfg)

    def key(self, image_path: str | os.PathLike) -> str:
        from ...data.cache import CacheMiss

        src = Path(image_path).resolve()
        try:
            st = src.stat()
        except OSError as e:
            raise CacheMiss(f"{src}: source volume not found ({e.strerror}); the cache key needs its size and mtime") from None
        ident = {"version": FEATURE_CACHE_VERSION, "vision": self.vision_id, "settings": self.cfg.frame_settings(),
                 "source": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def path(self, image_path: str | os.PathLike) -> Path:
        from ...data.release import volume_id_of
        return self.dir / f"{volume_id_of(image_path)}-{self.key(image_path)}.safetensors"

    def has(self, image_path: str | os.PathLike) -> bool:
        return self.path(image_path).is_file()

    def save(self, image_path: str | os.PathLike, entry: CachedFeatures) -> Path:
        path = self.path(image_path)
        tensors = {"features": entry.features.detach().contiguous().cpu(),
                   "grid_thw": torch.as_tensor(entry.grid_thw, dtype=torch.int64).reshape(3),
                   "volume_shape": torch.as_tensor(entry.volume_shape, dtype=torch.int64).reshape(3)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"source": str(Path(image_path).resolve()),
                                                  "vision": self.vision_id,
                                                  "settings": json.dumps(self.cfg.frame_settings())})
        return path

    def load(self, image_path: str | os.PathLike) -> CachedFeatures:
        """The cached entry; ``data.cache.CacheMiss`` (a FileNotFoundError) when the volume was not preprocessed."""
        from ...data.cache import CacheMiss

        path = self.path(image_path)
        if not path.is_file():
            raise CacheMiss(f"{image_path}: no vision features in {self.dir} for this model and frame settings "
                            f"{self.cfg.frame_settings()}; run `reasonknee3d preprocess --data DIR --config C` "
                            f"with the slice config first")
        t = load_file(str(path))
        return CachedFeatures(features=t["features"], grid_thw=t["grid_thw"],
                              volume_shape=tuple(int(v) for v in t["volume_shape"]))  # type: ignore[arg-type]


@torch.no_grad()
def compute_video_features(model: Any, processor: Any, cfg: SliceBaselineConfig, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the (frozen) vision tower on one video: (features ``(N, C)``, grid ``(3,)``)."""
    enc = encode_frames(processor, [frames], cfg)
    visual = base_model(model).model.visual
    out = base_model(model).get_video_features(enc["pixel_values_videos"].to(visual.device),
                                          video_grid_thw=enc["video_grid_thw"].to(visual.device))
    return resample_features(out.pooler_output[0], enc["video_grid_thw"][0], cfg)


def resample_features(features: torch.Tensor, grid_thw: torch.Tensor,
                      cfg: SliceBaselineConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.feature_tokens`` evenly spaced rows of ``(N, C)`` features (indices ``linspace(0, N - 1, K)``
    rounded down) and their grid ``(K, merge_size, merge_size)``; unchanged when ``feature_tokens`` is None."""
    if cfg.feature_tokens is None:
        return features, grid_thw
    k = cfg.feature_tokens
    idx = torch.from_numpy(np.linspace(0, features.shape[0] - 1, k).astype(np.int64)).to(features.device)
    return features[idx], torch.tensor([k, cfg.merge_size, cfg.merge_size], dtype=torch.int64)
