"""The paper's baseline: stock Qwen2.5-VL reading a knee volume as a video of 2D sagittal slices.

The volume ``(S, H, W)`` becomes ``T`` frames (which slices, how many, the intensity window and the frame
size come from ``SliceBaselineConfig``; the paper clipped intensities to 0-400 and used all 160 slices)
that go through Qwen's own video processor and vision tower. Frames are resized to ``frame_size`` here
and the processor's pixel limits are set explicitly, so the number of visual tokens is what the config
says (``token_count``) instead of the processor's upscaling defaults.

Fine-tuning follows the paper: the vision tower is frozen, so ``preprocess_slice_features`` runs it once
per volume and ``SliceFeatureCache`` keeps its output (safetensors, keyed by the vision weights, the frame
settings and the source file). Training feeds cached features to the language model through
``mm_encoder_outputs`` (LoRA on the language model only, trainable rows for the added box tokens, both
set up by ``training.stages.setup_trainable``). Prompts, answers and coordinate tokens are the same as for
the 3D-native model (``models.chat``, ``boxes.voxel_text_to_coord_tokens``).

The slice settings travel inside the model's ``config.json`` (``config.reasonknee3d_slice``), so every
``save_pretrained`` folder — init, checkpoints, final — says how its inputs were made.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..attention import select_attn_implementation
from ..boxes import clip_boxes, coord_tokens_to_text, validate_box, voxel_text_to_coord_tokens
from ..constants import VIDEO_PAD, VISION_END, VISION_START
from ..io_utils import atomic_dir, atomic_path, check_output_dir, write_output_marker
from .chat import decode_answer, encode_example, pad_examples
from .tiny_qwen import default_tiny_qwen_dir
from .tokens import add_box_tokens_to_model

logger = logging.getLogger(__name__)

SLICE_CONFIG_ATTR = "reasonknee3d_slice"
"""Attribute of the transformers config that holds the SliceBaselineConfig of a slice model folder."""

# Bump when the frame or feature code changes what is cached for the same settings.
FEATURE_CACHE_VERSION = 1
WINDOW_MODES = ("fixed", "percentile")
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
    """``fixed`` (the paper: 0-400) or ``percentile`` (per-volume percentiles)."""
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
    crop_margin: int = 4
    """Voxels added on every side of the reference box in the gt-crop setting."""
    system_prompt: Optional[str] = None
    """System turn of the chat; None keeps the template's default."""
    dtype: str = "float32"
    """Weight dtype: float32 | bfloat16 | float16."""

    def __post_init__(self) -> None:
        # YAML gives lists; store tuples so the config is hashable-ish and compares by value.
        for name in ("slice_range", "window", "frame_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        lm = self.language_model
        if not isinstance(lm, Mapping) or len(lm) != 1 or next(iter(lm)) not in ("path", "tiny"):
            raise ValueError(f"model.language_model must be {{path: DIR}} or {{tiny: {{sizes}}}}, got {lm!r}")
        if "tiny" in lm:
            if not isinstance(lm["tiny"] or {}, Mapping):
                raise ValueError(f"model.language_model.tiny must be a mapping of sizes, got {lm['tiny']!r}")
            from .tiny_qwen import TinyQwenSizes
            TinyQwenSizes.check(lm["tiny"], where="model.language_model.tiny")
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
        if self.crop_margin < 0:
            raise ValueError(f"model.crop_margin must be >= 0, got {self.crop_margin}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str = "model") -> "SliceBaselineConfig":
        """Build from a YAML mapping; unknown keys are errors that name ``where.key``."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{where}.{unknown[0]}: unknown key for the slice model (valid: {', '.join(sorted(known))})")
        return cls(**values)

    @property
    def pixel_limits(self) -> tuple[int, int]:
        area = self.frame_size[0] * self.frame_size[1]
        return (self.min_pixels if self.min_pixels is not None else area,
                self.max_pixels if self.max_pixels is not None else area)

    def frame_settings(self) -> dict[str, Any]:
        """The settings that change the frames, hence the cached vision features."""
        d = dataclasses.asdict(self)
        return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in FRAME_FIELDS}

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


# --- slices -> frames ----------------------------------------------------------------------------------

def select_slices(num_slices: int, cfg: SliceBaselineConfig) -> np.ndarray:
    """Indices along axis 0 of the frames, ascending.

    With ``num_frames`` set, exactly that many evenly spaced indices (repeating slices when the range is
    thinner), so the token count depends on the config only.
    """
    start = int(np.floor(cfg.slice_range[0] * num_slices))
    stop = max(start + 1, int(np.ceil(cfg.slice_range[1] * num_slices)))
    if cfg.num_frames is None:
        return np.arange(start, stop)
    # Centre of each of num_frames equal parts of [start, stop).
    return start + np.floor((np.arange(cfg.num_frames) + 0.5) * (stop - start) / cfg.num_frames).astype(np.int64)


def window_to_uint8(volume: np.ndarray, cfg: SliceBaselineConfig) -> np.ndarray:
    """Clip intensities to the window and map it linearly onto 0-255."""
    if cfg.window_mode == "fixed":
        lo, hi = cfg.window
    else:
        lo, hi = (float(v) for v in np.percentile(volume, cfg.window))
        hi = hi if hi > lo else lo + 1.0  # a flat crop would divide by zero
    scaled = (np.clip(volume.astype(np.float32), lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def crop_to_box(volume: np.ndarray, box: Sequence[int], margin: int) -> np.ndarray:
    """The sub-volume inside ``box`` grown by ``margin`` voxels per side (clipped to the volume)."""
    b = np.asarray(validate_box(box, volume.shape), dtype=np.int64)
    grown = clip_boxes(b + np.array([-margin, margin] * 3), volume.shape)
    a0, a1, b0, b1, c0, c1 = (int(v) for v in grown)
    return volume[a0:a1 + 1, b0:b1 + 1, c0:c1 + 1]


def volume_to_frames(volume: np.ndarray, cfg: SliceBaselineConfig, box: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``(S, H, W)`` volume -> ``(T, 3, h, w)`` uint8 RGB frames at ``cfg.frame_size``.

    ``box`` crops the volume to it (+ ``cfg.crop_margin``) first: the gt-crop setting.
    """
    if volume.ndim != 3:
        raise ValueError(f"expected a (S, H, W) volume, got shape {volume.shape}")
    if box is not None:
        volume = crop_to_box(volume, box, cfg.crop_margin)
    idx = select_slices(volume.shape[0], cfg)
    frames = torch.from_numpy(window_to_uint8(volume[idx], cfg)).float().unsqueeze(1)  # (T, 1, H, W)
    # antialias: shrinking 384 -> 224 would otherwise alias thin cartilage edges.
    frames = F.interpolate(frames, size=tuple(cfg.frame_size), mode="bilinear", align_corners=False, antialias=True)
    return frames.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()  # (T, 3, h, w)


# --- Qwen video processor ----------------------------------------------------------------------------

def video_processor_kwargs(cfg: SliceBaselineConfig) -> dict[str, Any]:
    """Keyword arguments that make the video processor keep our frames and frame count as they are."""
    lo, hi = cfg.pixel_limits
    return {"size": {"shortest_edge": lo, "longest_edge": hi}, "do_sample_frames": False,
            "cap_pixels_per_frame": False}


def configure_processor(processor: Any, cfg: SliceBaselineConfig) -> Any:
    """Set the processor's video pixel limits from ``cfg`` (saved with it) and check the patch geometry."""
    vp = processor.video_processor
    have = (vp.patch_size, vp.merge_size, vp.temporal_patch_size)
    want = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    if have != want:
        raise ValueError(f"checkpoint video processor has (patch_size, merge_size, temporal_patch_size) = {have}, "
                         f"the slice config says {want}; set model.patch_size / merge_size / temporal_patch_size")
    kwargs = video_processor_kwargs(cfg)
    vp.size = kwargs["size"]
    vp.do_sample_frames = False
    vp.cap_pixels_per_frame = False
    return processor


def encode_frames(processor: Any, videos: Sequence[torch.Tensor], cfg: SliceBaselineConfig) -> dict[str, torch.Tensor]:
    """``pixel_values_videos`` (patches of all videos) and ``video_grid_thw`` ``(n_videos, 3)``."""
    out = processor.video_processor(videos=list(videos), return_tensors="pt", **video_processor_kwargs(cfg))
    return {"pixel_values_videos": out["pixel_values_videos"], "video_grid_thw": out["video_grid_thw"]}


def video_token_count(grid_thw: Sequence[int] | torch.Tensor, merge_size: int) -> int:
    """Language-model tokens of one video grid (t, h, w)."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size ** 2)


def media_text(num_tokens: int) -> str:
    """The user-turn media string of one video: ``<|vision_start|>`` + N ``<|video_pad|>`` + ``<|vision_end|>``."""
    return VISION_START + VIDEO_PAD * num_tokens + VISION_END


def token_count(cfg: SliceBaselineConfig | Mapping[str, Any], volume_shape: Sequence[int]) -> int:
    """Visual tokens the language model reads for one volume of ``volume_shape`` (S, H, W)."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import smart_resize

    cfg = as_slice_config(cfg)
    frames = len(select_slices(int(volume_shape[0]), cfg))
    lo, hi = cfg.pixel_limits
    h, w = smart_resize(*cfg.frame_size, factor=cfg.patch_size * cfg.merge_size, min_pixels=lo, max_pixels=hi)
    grid_t = -(-frames // cfg.temporal_patch_size)
    return video_token_count((grid_t, h // cfg.patch_size, w // cfg.patch_size), cfg.merge_size)


# --- vision-feature cache ----------------------------------------------------------------------------

def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_fingerprint(model: Any) -> str:
    """Hash of the vision tower's weights (names, dtypes, shapes, bytes); computed once per model object.

    Two folders holding the same vision weights (a base checkpoint and a slice model made from it) share
    cache entries; any change to the tower gives new ones.
    """
    base = _base(model)
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
        from ..data.cache import CacheMiss

        src = Path(image_path).resolve()
        try:
            st = src.stat()
        except OSError as e:
            raise CacheMiss(f"{src}: source volume not found ({e.strerror}); the cache key needs its size and mtime") from None
        ident = {"version": FEATURE_CACHE_VERSION, "vision": self.vision_id, "settings": self.cfg.frame_settings(),
                 "source": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def path(self, image_path: str | os.PathLike) -> Path:
        from ..data.release import volume_id_of
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
        from ..data.cache import CacheMiss

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
    visual = _base(model).model.visual
    out = _base(model).get_video_features(enc["pixel_values_videos"].to(visual.device),
                                          video_grid_thw=enc["video_grid_thw"].to(visual.device))
    return out.pooler_output[0], enc["video_grid_thw"][0]


def preprocess_slice_features(data_dir: str | os.PathLike, cfg: SliceBaselineConfig | Mapping[str, Any],
                              cache_dir: Optional[str | os.PathLike] = None,
                              splits: Iterable[str] = ("train", "val", "test"),
                              model_dir: Optional[str | os.PathLike] = None) -> Any:
    """Fill the feature cache for every volume of ``splits`` (each once); returns a ``release.BatchResult``.

    The vision tower comes from ``model_dir`` (a slice model folder) or else from the config's base
    checkpoint; both give the same features when they hold the same vision weights. The default cache
    folder is ``<data_dir>/cache/slice_features``. Unreadable volumes are skipped and listed in
    ``<cache_dir>/preprocess_skipped.jsonl``.
    """
    from ..data.cache import fill_volume_cache
    from ..data.io import load_volume
    from ..data.release import ReleaseLoader

    cfg = as_slice_config(cfg)
    loader = ReleaseLoader(data_dir)
    model, processor = load_slice_model(model_dir) if model_dir is not None else build_slice_model(cfg)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    cache = SliceFeatureCache.for_model(cache_dir if cache_dir is not None else loader.root / "cache" / "slice_features",
                                        model, cfg)

    def put(image_path: Path) -> None:
        volume, meta = load_volume(image_path)
        feats, grid = compute_video_features(model, processor, cfg, volume_to_frames(volume, cfg))
        cache.save(image_path, CachedFeatures(feats, grid, meta.shape))

    result = fill_volume_cache(loader.root, cache.dir, splits, cache.has, put)
    logger.info("slice features: %d volumes in %s, %d skipped", result.n_done, cache.dir, len(result.skipped))
    return result


# --- models ----------------------------------------------------------------------------------------

def slice_config_of(model: Any) -> SliceBaselineConfig:
    """The SliceBaselineConfig stored in a slice model's config."""
    raw = getattr(_base(model).config, SLICE_CONFIG_ATTR, None)
    if raw is None:
        raise ValueError(f"{getattr(_base(model), 'name_or_path', 'model')}: config has no {SLICE_CONFIG_ATTR!r}; "
                         "not a slice model folder (write one with `reasonknee3d init` and a slice config)")
    return SliceBaselineConfig.from_dict(raw, where=f"config.{SLICE_CONFIG_ATTR}")


def _load_pretrained(path: Path, dtype: torch.dtype, attn_implementation: str) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=select_attn_implementation(attn_implementation))
    return model, processor


def build_slice_model(cfg: SliceBaselineConfig | Mapping[str, Any], attn_implementation: str = "auto") -> tuple[Any, Any]:
    """A fresh slice model and processor: the base checkpoint + box tokens + the configured video processor.

    The coordinate tokens get initialised rows (``tokens.add_box_tokens_to_model``) and the config is
    stored in ``model.config.reasonknee3d_slice``. No adapter: the trainer adds LoRA
    (``training.stages.setup_trainable``).
    """
    cfg = as_slice_config(cfg)
    model, processor = _load_pretrained(base_model_dir(cfg), DTYPES[cfg.dtype], attn_implementation)
    configure_processor(processor, cfg)
    add_box_tokens_to_model(model, processor.tokenizer, cfg.num_bins)
    setattr(model.config, SLICE_CONFIG_ATTR, cfg.to_dict())
    return model, processor


def load_slice_model(model_dir: str | os.PathLike, attn_implementation: str = "auto") -> tuple[Any, Any]:
    """(model, processor) of a saved slice folder; an adapter in the folder is attached by transformers."""
    from transformers import AutoConfig

    path = Path(model_dir)
    config = AutoConfig.from_pretrained(path)
    raw = getattr(config, SLICE_CONFIG_ATTR, None)
    if raw is None:
        raise ValueError(f"{path}: config.json has no {SLICE_CONFIG_ATTR!r}; not a slice model folder")
    cfg = SliceBaselineConfig.from_dict(raw, where=f"{path}/config.json:{SLICE_CONFIG_ATTR}")
    model, processor = _load_pretrained(path, DTYPES[cfg.dtype], attn_implementation)
    return model, configure_processor(processor, cfg)


def slice_module_paths(model: Any) -> dict[str, list[str]]:
    """Module roles for ``training.stages.setup_trainable``.

    The merger is Qwen's projector; with cached features neither it nor the vision blocks can train.
    """
    return {"encoder": ["model.visual"], "projector": ["model.visual.merger"],
            "language_model": ["model.language_model", "lm_head"]}


def new_token_ids(processor: Any, cfg: SliceBaselineConfig) -> list[int]:
    """Ids of the coordinate tokens (``<|coord_0|>`` ..), whose rows train with ``new_token_rows``."""
    from ..constants import COORD_TOKEN_FORMAT
    return list(processor.tokenizer.convert_tokens_to_ids([COORD_TOKEN_FORMAT.format(k) for k in range(cfg.num_bins)]))


def check_slice_train_config(train: Any) -> None:
    """Cached features fix the vision tower and its merger: they must be frozen (raises ValueError)."""
    for role in ("encoder", "projector"):
        if getattr(train, role) != "frozen":
            raise ValueError(f"train.{role}: the slice baseline trains on cached vision features, so the vision "
                             f"{role} must be frozen, got {getattr(train, role)!r}")


def init_slice_model(cfg_dict: Mapping[str, Any], out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write an untrained slice model folder: base + box tokens + processor + LoRA adapter (zero update).

    LoRA and the trainable coordinate-token rows come from the experiment's ``train:`` section through
    ``training.stages.setup_trainable`` (targets anchored on the language model). The folder holds the base
    weights and the adapter side by side, so ``Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir)``
    returns the model with its adapter. Written in a temporary sibling and renamed into place. ``out_dir``
    must be new or empty, or hold an earlier ``init`` output and ``overwrite`` be set (``io_utils.check_output_dir``).
    """
    from peft import PeftModel

    from ..training.config import TrainConfig
    from ..training.stages import setup_trainable

    settings = {"family": "slice", "model": cfg_dict.get("model") or {}, "train": cfg_dict.get("train") or {}}
    check_output_dir(out_dir, "init", overwrite, settings)
    cfg = as_slice_config(cfg_dict)
    try:
        train = TrainConfig(**dict(cfg_dict.get("train") or {}))
    except TypeError as e:
        raise ValueError(f"train: {e}") from None
    check_slice_train_config(train)
    model, processor = build_slice_model(cfg)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)  # base weights first: the adapter below holds only what trains
        trainable = setup_trainable(model, train, slice_module_paths(model), new_token_ids(processor, cfg))
        if isinstance(trainable, PeftModel):
            trainable.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_output_marker(tmp, "init", settings)
    return Path(out_dir)


# --- batches ---------------------------------------------------------------------------------------

class SliceCollator:
    """Model-ready batches from data-layer ``Sample``s (``data.release.Sample``).

    With ``cache`` the batch carries cached vision features as ``mm_encoder_outputs`` (the training path);
    without, it carries ``pixel_values_videos`` computed from the volume (zero-shot, gt-crop). ``train``
    adds labels (answer with coordinate tokens, right padding); otherwise the batch ends at the generation
    prompt (left padding). ``prompt_fn`` replaces a sample's prompt (zero-shot settings); ``crop`` cuts the
    volume to the sample's reference box first.
    """

    def __init__(self, processor: Any, cfg: SliceBaselineConfig, cache: Optional[SliceFeatureCache] = None, *,
                 train: bool = True, prompt_fn: Optional[Callable[[Any], str]] = None, crop: bool = False) -> None:
        if crop and cache is not None:
            raise ValueError("crop and the feature cache exclude each other: cached features are of whole volumes")
        self.processor, self.tokenizer, self.cfg = processor, processor.tokenizer, cfg
        self.cache, self.train, self.prompt_fn, self.crop = cache, train, prompt_fn, crop
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        # Qwen2-VL has no per-video time step; Qwen2.5-VL's processor lists it as a model input.
        self.with_time = "second_per_grid_ts" in getattr(processor, "model_input_names", ())

    def _visual(self, sample: Any) -> tuple[Optional[CachedFeatures], Optional[torch.Tensor], tuple[int, int, int]]:
        if self.cache is not None:
            entry = self.cache.load(sample.image_path)
            return entry, None, entry.volume_shape
        from ..data.io import load_volume

        volume, meta = load_volume(sample.image_path)
        if self.crop and sample.box is None:
            raise ValueError(f"sample {sample.sample_id}: the gt-crop setting needs a reference box, the sample has none")
        return None, volume_to_frames(volume, self.cfg, sample.box if self.crop else None), meta.shape

    def collate(self, samples: Sequence[Any]) -> tuple[dict[str, Any], list[tuple[int, int, int]]]:
        """(batch, source volume shapes); shapes turn generated coordinate tokens back into voxel boxes."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        entries, videos, shapes, rows = [], [], [], []
        for s in samples:
            entry, frames, shape = self._visual(s)
            entries.append(entry)
            videos.append(frames)
            shapes.append(shape)
        if self.cache is None:
            enc = encode_frames(self.processor, videos, self.cfg)
            grids = enc["video_grid_thw"]
        else:
            grids = torch.stack([e.grid_thw for e in entries])
        for s, shape, grid in zip(samples, shapes, grids):
            n = video_token_count(grid, self.cfg.merge_size)
            answer = voxel_text_to_coord_tokens(s.answer, shape, self.cfg.num_bins) if self.train else None
            prompt = self.prompt_fn(s) if self.prompt_fn is not None else s.prompt
            rows.append(encode_example(self.tokenizer, prompt, answer, media_text(n), self.cfg.system_prompt))

        # Generation continues from the last position, so pad on the left.
        padded = pad_examples(rows, self.tokenizer.pad_token_id, left=not self.train)
        ids, labels, mask = padded["input_ids"], padded["labels"], padded["attention_mask"]
        # 0 text, 2 video: without it Qwen silently falls back to 1D positions for the video tokens.
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                 "mm_token_type_ids": (ids == self.video_token_id).long() * 2,
                                 "video_grid_thw": grids.long()}
        if self.train:
            batch["labels"] = labels
        if self.with_time:
            batch["second_per_grid_ts"] = torch.full((len(rows),), self.cfg.temporal_patch_size / self.cfg.fps)
        if self.cache is None:
            batch["pixel_values_videos"] = enc["pixel_values_videos"]
        else:
            feats = tuple(e.features for e in entries)
            batch["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=feats)}
        return batch, shapes

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        return self.collate(samples)[0]


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v.to(device)
        elif k == "mm_encoder_outputs":
            from transformers.modeling_outputs import BaseModelOutputWithPooling
            out[k] = {m: BaseModelOutputWithPooling(pooler_output=tuple(t.to(device) for t in o.pooler_output))
                      for m, o in v.items()}
        else:
            out[k] = v
    return out


@torch.no_grad()
def generate_answers(model: Any, collator: SliceCollator, samples: Sequence[Any], max_new_tokens: int = 512,
                     batch_size: int = 1) -> list[str]:
    """Greedy answers for ``samples``; coordinate-token boxes come back as voxel boxes of each source volume."""
    if collator.train:
        raise ValueError("generate_answers needs a collator built with train=False (no answers, left padding)")
    model.eval()
    device = next(model.parameters()).device
    tok = collator.tokenizer
    out: list[str] = []
    for start in range(0, len(samples), batch_size):
        batch, shapes = collator.collate(samples[start:start + batch_size])
        batch = _to_device(batch, device)
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        width = batch["input_ids"].shape[1]
        for row, shape in zip(gen[:, width:], shapes):
            out.append(coord_tokens_to_text(decode_answer(tok, row.tolist()), shape, collator.cfg.num_bins))
    return out


def benchmark_feature_cache(model: Any, processor: Any, cfg: SliceBaselineConfig, image_path: str | os.PathLike,
                            cache_dir: str | os.PathLike, repeats: int = 7) -> dict[str, float]:
    """Median seconds per volume: cache miss (load + frames + vision tower), vision tower alone, cache hit.

    For ``reasonknee3d bench``: the ratios are measured in one run on one machine.
    """
    import statistics
    import time

    from ..data.io import load_volume

    def median_of(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    model.eval()
    cache = SliceFeatureCache.for_model(cache_dir, model, cfg)
    volume, meta = load_volume(image_path)
    frames = volume_to_frames(volume, cfg)
    feats, grid = compute_video_features(model, processor, cfg, frames)
    cache.save(image_path, CachedFeatures(feats, grid, meta.shape))
    miss = median_of(lambda: compute_video_features(model, processor, cfg, volume_to_frames(load_volume(image_path)[0], cfg)))
    tower = median_of(lambda: compute_video_features(model, processor, cfg, frames))
    hit = median_of(lambda: cache.load(image_path))
    return {"miss_s": miss, "tower_s": tower, "hit_s": hit, "speedup_vs_miss": miss / hit,
            "speedup_vs_tower": tower / hit, "visual_tokens": float(feats.shape[0])}
