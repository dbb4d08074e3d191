"""The slice baseline's inputs: a volume -> frames -> Qwen's video processor -> a model batch.

The volume ``(S, H, W)`` becomes ``T`` frames (which slices, how many, the intensity window and the frame
size come from ``SliceBaselineConfig``) that go through Qwen's own video processor. Frames are resized to
``frame_size`` here and the processor's pixel limits are set explicitly, so the number of visual tokens is
what the config says (``token_count``) instead of the processor's upscaling defaults. ``SliceCollator``
turns data-layer samples into batches, from cached vision features (training, ``predict``) or from pixels
(zero-shot). Prompts, answers and coordinate tokens are the same as for the 3D-native model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ...boxes import clip_boxes, validate_box, voxel_text_to_coord_tokens
from ...constants import VIDEO_PAD, VISION_END, VISION_START
from ..chat import encode_example, pad_examples
from .configuration_slice import SliceBaselineConfig, as_slice_config

if TYPE_CHECKING:
    from .features import CachedFeatures, SliceFeatureCache

class CachedVideoOutput(BaseModelOutputWithPooling):
    """Cached vision features as a batch carries them to Qwen2.5-VL (``mm_encoder_outputs["video"]``).

    On CUDA the Trainer's DataLoader pins each batch's memory; torch pins a mapping by copying it and calling
    ``update`` on the copy, which every ``ModelOutput`` refuses ("You cannot use ``update``"). This type pins
    its own tensors instead (torch asks an object for ``pin_memory`` before treating it as a mapping)."""

    def pin_memory(self, device: Any = None) -> "CachedVideoOutput":
        return type(self)(pooler_output=tuple(t.pin_memory() for t in self.pooler_output))


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
    """Clip intensities to the window and map it linearly onto 0-255 (``slice_minmax``: each slice of the
    ``(T, H, W)`` stack from its own minimum to its own maximum after the clip; a flat slice is black)."""
    if cfg.window_mode == "slice_minmax":
        v = np.clip(volume.astype(np.float32), *cfg.window)
        lo = v.min(axis=tuple(range(1, v.ndim)), keepdims=True)
        span = v.max(axis=tuple(range(1, v.ndim)), keepdims=True) - lo
        scaled = np.divide(v - lo, span, out=np.zeros_like(v), where=span > 0) * 255.0
        return np.rint(scaled).astype(np.uint8)
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
    if cfg.feature_tokens is not None:
        return cfg.feature_tokens
    frames = len(select_slices(int(volume_shape[0]), cfg))
    lo, hi = cfg.pixel_limits
    h, w = smart_resize(*cfg.frame_size, factor=cfg.patch_size * cfg.merge_size, min_pixels=lo, max_pixels=hi)
    grid_t = -(-frames // cfg.temporal_patch_size)
    return video_token_count((grid_t, h // cfg.patch_size, w // cfg.patch_size), cfg.merge_size)


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
        if cfg.feature_tokens is not None and cache is None:
            raise ValueError(f"model.feature_tokens={cfg.feature_tokens} resamples cached vision features; this "
                             f"path reads pixels, which would reach the model unresampled. Run `reasonknee3d "
                             f"preprocess` and use the feature cache (train / predict)")
        self.processor, self.tokenizer, self.cfg = processor, processor.tokenizer, cfg
        self.cache, self.train, self.prompt_fn, self.crop = cache, train, prompt_fn, crop
        self.video_token_id = self.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        # Qwen2-VL has no per-video time step; Qwen2.5-VL's processor lists it as a model input.
        self.with_time = "second_per_grid_ts" in getattr(processor, "model_input_names", ())

    def _visual(self, sample: Any) -> tuple[Optional[CachedFeatures], Optional[torch.Tensor], tuple[int, int, int]]:
        if self.cache is not None:
            entry = self.cache.load(sample.image_path)
            return entry, None, entry.volume_shape
        from ...data.io import load_volume

        volume, meta = load_volume(sample.image_path)
        if self.crop and sample.box is None:
            raise ValueError(f"sample {sample.sample_id}: the gt-crop setting needs a reference box, the sample has none")
        return None, volume_to_frames(volume, self.cfg, sample.box if self.crop else None), meta.shape

    def collate(self, samples: Sequence[Any]) -> tuple[dict[str, Any], list[tuple[int, int, int]]]:
        """(batch, source volume shapes); shapes turn generated coordinate tokens back into voxel boxes."""
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
            batch["mm_encoder_outputs"] = {"video": CachedVideoOutput(pooler_output=feats)}
        return batch, shapes

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        return self.collate(samples)[0]
