"""The paper's baseline: stock Qwen2.5-VL reading a knee volume as a video of 2D sagittal slices.

A slice model is the base Qwen2.5-VL (or Qwen2-VL) checkpoint plus the coordinate tokens, with its
``SliceBaselineConfig`` stored in ``config.json``. Training adds LoRA on the language model and trainable rows
for the added tokens (``training.stages.setup_trainable``); the vision tower stays frozen and its features are
cached (``features.py``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from ...attention import NO_HUB_KERNELS, select_attn_implementation
from ...constants import COORD_TOKEN_FORMAT
from ..precision import FLOAT32_MODULES, cast_outside_float32_modules, restore_adapter_precision
from ..tokens import add_box_tokens_to_model
from .configuration_slice import DTYPES, SLICE_CONFIG_ATTR, SliceBaselineConfig, as_slice_config, base_model_dir
from .features import CachedFeatures, SliceFeatureCache, base_model, compute_video_features
from .processing_slice import configure_processor, volume_to_frames
logger = logging.getLogger(__name__)


def slice_config_of(model: Any) -> SliceBaselineConfig:
    """The SliceBaselineConfig stored in a slice model's config."""
    raw = getattr(base_model(model).config, SLICE_CONFIG_ATTR, None)
    if raw is None:
        raise ValueError(f"{getattr(base_model(model), 'name_or_path', 'model')}: config has no {SLICE_CONFIG_ATTR!r}; "
                         "not a slice model folder (write one with `reasonknee3d init` and a slice config)")
    return SliceBaselineConfig.from_dict(raw, where=f"config.{SLICE_CONFIG_ATTR}")


def _load_pretrained(path: Path, dtype: torch.dtype, attn_implementation: str) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=select_attn_implementation(attn_implementation), **NO_HUB_KERNELS)
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
    # A language model trained in full was saved float32 beside the frozen half-precision vision tower
    # (config.float32_modules): load all in float32, exactly, and cast the rest back to the dtype it was saved in.
    float32_modules = getattr(config, FLOAT32_MODULES, None)
    dtype = DTYPES[cfg.dtype]
    model, processor = _load_pretrained(path, torch.float32 if float32_modules else dtype, attn_implementation)
    if float32_modules:
        cast_outside_float32_modules(model, float32_modules, dtype)
    restore_adapter_precision(model, path)  # LoRA and token rows come back float32, as they were saved
    return model, configure_processor(processor, cfg)


def slice_module_paths(model: Any) -> dict[str, list[str]]:
    """Module roles for ``training.stages.setup_trainable``.

    The merger is Qwen's projector; with cached features neither it nor the vision blocks can train.
    """
    return {"encoder": ["model.visual"], "projector": ["model.visual.merger"],
            "language_model": ["model.language_model", "lm_head"]}


def new_token_ids(processor: Any, cfg: SliceBaselineConfig) -> list[int]:
    """Ids of the coordinate tokens (``<|coord_0|>`` ..), whose rows train with ``new_token_rows``."""
    return list(processor.tokenizer.convert_tokens_to_ids([COORD_TOKEN_FORMAT.format(k) for k in range(cfg.num_bins)]))


def preprocess_slice_features(data_dir: str | os.PathLike, cfg: SliceBaselineConfig | Mapping[str, Any],
                              cache_dir: Optional[str | os.PathLike] = None,
                              splits: Iterable[str] = ("train", "val", "test"),
                              model_dir: Optional[str | os.PathLike] = None,
                              images: Optional[str | os.PathLike] = None, distributed: bool = False) -> Any:
    """Fill the feature cache for every volume of ``splits`` (each once); returns a ``cache.CacheFillResult``.

    The vision tower comes from ``model_dir`` (a slice model folder) or else from the config's base
    checkpoint; both give the same features when they hold the same vision weights. The default cache
    folder is ``<data_dir>/cache/slice_features``. Unreadable volumes are skipped and listed in
    ``<cache_dir>/preprocess_skipped.jsonl``. ``distributed``: split the volumes over the processes of a
    torchrun / accelerate launch (``data.cache.fill_volume_cache``), each running the tower on its own GPU
    (``cuda:LOCAL_RANK``).
    """
    from ...data.cache import fill_volume_cache
    from ...data.distributed import local_device
    from ...data.io import load_volume
    from ...data.release import ReleaseLoader

    cfg = as_slice_config(cfg)
    loader = ReleaseLoader(data_dir)
    model, processor = load_slice_model(model_dir) if model_dir is not None else build_slice_model(cfg)
    model.eval()
    if torch.cuda.is_available():
        model.to(local_device())
    cache = SliceFeatureCache.for_model(cache_dir if cache_dir is not None else loader.root / "cache" / "slice_features",
                                        model, cfg)

    def put(image_path: Path) -> None:
        volume, meta = load_volume(image_path)
        feats, grid = compute_video_features(model, processor, cfg, volume_to_frames(volume, cfg))
        cache.save(image_path, CachedFeatures(feats, grid, meta.shape))

    result = fill_volume_cache(loader.root, cache.dir, splits, cache.has, put, images=images,
                               distributed=distributed)
    logger.info("slice features: %d volumes in %s, %d skipped", result.n_done, cache.dir, len(result.skipped))
    return result
