"""Configuration of the slice baseline: the ``model:`` section of a ``family: slice`` experiment.

The settings travel inside the model's ``config.json`` (``config.reasonknee3d_slice``), so every
``save_pretrained`` folder (init, checkpoints, final) says how its inputs were made.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ...config import from_mapping
from ..tiny_qwen import check_language_model, default_tiny_qwen_dir

SLICE_CONFIG_ATTR = "reasonknee3d_slice"
"""Attribute of the transformers config that holds the SliceBaselineConfig of a slice model folder."""

# Bump when the frame or feature code changes what is cached for the same settings.
FEATURE_CACHE_VERSION = 1
WINDOW_MODES = ("fixed", "percentile", "slice_minmax")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Fields of SliceBaselineConfig that change the frames (and so the cached vision features).
FRAME_FIELDS = ("num_frames", "slice_range", "window", "window_mode", "frame_size", "min_pixels", "max_pixels")


@dataclass(frozen=True)
class SliceBaselineConfig:
    """The ``model:`` section of a ``family: slice`` experiment."""

    language_model: dict = field(default_factory=lambda: {"tiny": {}})
    """``{path: DIR}`` (a local Qwen2.5-VL / Qwen2-VL checkpoint) or ``{tiny: {sizes}}`` (built on first use)."""
    num_bins: int = 64
    """Coordinate bins K per axis for box tokens (the same tokens as the 3D-native model)."""
    num_frames: Optional[int] = None
    """Slices sampled evenly along axis 0 within ``slice_range``; None uses every slice there."""
    slice_range: tuple[float, float] = (0.0, 1.0)
    """Fractions of the slice axis [start, end) the frames are taken from."""
    window: tuple[float, float] = (0.0, 400.0)
    """Intensity window mapped to 0-255: raw values (``fixed``) or percentiles of the volume (``percentile``)."""
    window_mode: str = "fixed"
    """``fixed`` (0-400 mapped onto 0-255), ``percentile`` (per-volume percentiles) or ``slice_minmax`` (the
    paper's preprocessing: clip to the raw window, then scale each slice by its own minimum and maximum)."""
    frame_size: tuple[int, int] = (224, 224)
    """(height, width) each slice is resized to; multiples of patch_size * merge_size."""
    min_pixels: Optional[int] = None
    """Video processor lower pixel limit per frame; None: frame height * width (keeps frame_size as is)."""
    max_pixels: Optional[int] = None
    """Video processor upper pixel limit per frame; None: frame height * width."""
    fps: float = 2.0
    """Frame rate attributed to the slice sequence (M-RoPE temporal step = tokens_per_second * 2 / fps)."""
    patch_size: int = 14
    """Vision patch size of the checkpoint (checked against it when the processor is set up)."""
    merge_size: int = 2
    """Patches merged per side into one language-model token (checked against the checkpoint)."""
    temporal_patch_size: int = 2
    """Frames per temporal patch (checked against the checkpoint)."""
    feature_tokens: Optional[int] = None
    """Resample each volume's cached vision features to this many tokens (evenly spaced picks along the
    token sequence, repeats when there are fewer); None keeps every token. The paper fed 8,192 of the
    15,680 tokens of 160 slices at 392 x 392. The picked tokens go to the language model as a one-token-
    per-step sequence (video grid ``(feature_tokens, merge_size, merge_size)``), so their M-RoPE positions
    advance one temporal step per token at ``fps`` = 2 * tokens_per_second / temporal_patch_size. Needs the
    feature cache (``reasonknee3d preprocess``): pixel inputs would reach the model unresampled."""
    crop_margin: int = 4
    """Voxels added on every side of the reference box in the gt-crop setting."""
    system_prompt: Optional[str] = None
    """System turn of the chat; None keeps the template's default."""
    dtype: str = "float32"
    """Weight dtype: float32 | bfloat16 | float16."""

    def __post_init__(self) -> None:
        # YAML gives lists; store tuples so the config is hashable-ish and compares by value.
        # The same settings must hash the same whether written 1 or 1.0 (feature cache keys).
        for name, kind in (("slice_range", float), ("window", float), ("frame_size", int)):
            object.__setattr__(self, name, tuple(kind(v) for v in getattr(self, name)))
        check_language_model(self.language_model)
        if self.num_bins < 2:
            raise ValueError(f"model.num_bins must be >= 2, got {self.num_bins}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"model.num_frames must be >= 1 or null, got {self.num_frames}")
        lo, hi = self.slice_range
        if len(self.slice_range) != 2 or not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"model.slice_range must be [start, end] with 0 <= start < end <= 1, got {self.slice_range}")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"model.window_mode must be one of {WINDOW_MODES}, got {self.window_mode!r}")
        if len(self.window) != 2 or not self.window[0] < self.window[1]:
            raise ValueError(f"model.window must be [low, high] with low < high, got {self.window}")
        if self.window_mode == "percentile" and not (0 <= self.window[0] and self.window[1] <= 100):
            raise ValueError(f"model.window: percentiles must lie in [0, 100], got {self.window}")
        factor = self.patch_size * self.merge_size
        if len(self.frame_size) != 2 or any(s < factor or s % factor for s in self.frame_size):
            raise ValueError(f"model.frame_size must be two multiples of patch_size * merge_size = {factor}, "
                             f"got {self.frame_size}")
        lo_px, hi_px = self.pixel_limits
        if lo_px > hi_px:
            raise ValueError(f"model.min_pixels {lo_px} exceeds model.max_pixels {hi_px}")
        if self.fps <= 0:
            raise ValueError(f"model.fps must be > 0, got {self.fps}")
        if self.feature_tokens is not None and (isinstance(self.feature_tokens, bool)
                                                or not isinstance(self.feature_tokens, int) or self.feature_tokens < 1):
            raise ValueError(f"model.feature_tokens must be a positive integer or null, got {self.feature_tokens!r}")
        if self.crop_margin < 0:
            raise ValueError(f"model.crop_margin must be >= 0, got {self.crop_margin}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "model") -> "SliceBaselineConfig":
        """Build from a YAML mapping (``config.from_mapping``: unknown keys and wrong types name ``where.key``)."""
        return from_mapping(cls, dict(values) if isinstance(values, Mapping) else values, where)

    @property
    def pixel_limits(self) -> tuple[int, int]:
        area = self.frame_size[0] * self.frame_size[1]
        return (self.min_pixels if self.min_pixels is not None else area,
                self.max_pixels if self.max_pixels is not None else area)

    def frame_settings(self) -> dict[str, Any]:
        """The settings that change the frames, hence the cached vision features."""
        d = dataclasses.asdict(self)
        out = {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in FRAME_FIELDS}
        if self.feature_tokens is not None:  # only when set, so caches of other configs keep their keys
            out["feature_tokens"] = self.feature_tokens
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def as_slice_config(cfg: SliceBaselineConfig | Mapping[str, Any]) -> SliceBaselineConfig:
    """A SliceBaselineConfig from itself, a ``model:`` section, or a whole experiment mapping."""
    if isinstance(cfg, SliceBaselineConfig):
        return cfg
    if isinstance(cfg, Mapping) and "family" in cfg:
        if cfg["family"] != "slice":
            raise ValueError(f"family: expected 'slice' for the slice baseline, got {cfg['family']!r}")
        return SliceBaselineConfig.from_dict(cfg.get("model") or {})
    return SliceBaselineConfig.from_dict(cfg)


def base_model_dir(cfg: SliceBaselineConfig) -> Path:
    """Folder of the Qwen checkpoint the config names (building the tiny one on first use)."""
    lm = cfg.language_model
    if "tiny" in lm:
        return default_tiny_qwen_dir(**dict(lm["tiny"] or {}))
    path = Path(lm["path"]).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.language_model.path {path}: no config.json; expected a local Qwen2.5-VL "
                                f"or Qwen2-VL checkpoint folder")
    return path
