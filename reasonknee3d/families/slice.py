"""Family ``slice``: the paper's baseline, stock Qwen2.5-VL over sagittal slices, trained on cached vision features."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError
from ..models.slice.configuration_slice import SLICE_CONFIG_ATTR, SliceBaselineConfig
from .registry import Collate, Family, Items, PredictCollate, SampleInfo, register_family, release_samples

if TYPE_CHECKING:
    from .experiment import ExperimentConfig

logger = logging.getLogger(__name__)


@register_family("slice")
class SliceFamily(Family):
    """The paper's baseline: stock Qwen2.5-VL over sagittal slices, trained on cached vision features."""

    model_config_class = SliceBaselineConfig

    @property
    def model_class(self) -> type:
        from transformers import AutoModelForImageTextToText
        return AutoModelForImageTextToText

    def check(self, exp: "ExperimentConfig") -> None:
        if exp.data.canonical_side is not None:
            raise ConfigError("data.canonical_side: the slice baseline reads volumes as stored (its frame and "
                              "feature caches do not mirror); leave it unset for family slice")
        if exp.data.recentre is not None:
            raise ConfigError("data.recentre: the slice baseline reads volumes as stored (its frame and feature "
                              "caches do not move them); leave it unset for family slice")
        # Cached features fix the vision tower and its merger.
        for role in ("encoder", "projector"):
            if getattr(exp.train, role) != "frozen":
                raise ConfigError(f"train.{role}: the slice baseline trains on cached vision features, so the "
                                  f"vision {role} must be frozen, got {getattr(exp.train, role)!r}")

    def owns_model_dir(self, config: dict[str, Any]) -> bool:
        return SLICE_CONFIG_ATTR in config

    def build(self, exp: "ExperimentConfig", attn_implementation: str) -> tuple[nn.Module, Any]:
        from ..models.slice.modeling_slice import build_slice_model
        return build_slice_model(exp.model, attn_implementation)

    def load(self, model_dir: str | Path, attn_implementation: str) -> tuple[nn.Module, Any]:
        from ..models.slice.modeling_slice import load_slice_model
        return load_slice_model(model_dir, attn_implementation)

    def preprocess(self, exp: "ExperimentConfig", data_dir: str | Path, splits: Sequence[str]) -> Any:
        from ..data.release import cache_root
        from ..models.slice.modeling_slice import preprocess_slice_features
        return preprocess_slice_features(data_dir, exp.model, cache_root(data_dir, exp.data.cache_dir) / "slice_features",
                                         splits, images=exp.data.images, distributed=True)

    def num_visual_tokens(self, exp: "ExperimentConfig", volume_shape: Sequence[int]) -> int:
        from ..models.slice.processing_slice import token_count
        return token_count(exp.model, volume_shape)

    def module_paths(self, model: nn.Module) -> dict[str, list[str]]:
        from ..models.slice.modeling_slice import slice_module_paths
        return slice_module_paths(model)

    def new_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        return self.coord_token_ids(model, processor)  # the coordinate tokens are the only added rows

    def coord_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        from ..models.slice.modeling_slice import new_token_ids, slice_config_of
        return new_token_ids(processor, slice_config_of(model))

    def _items(self, model: nn.Module, data_dir: str | Path, split: str, images: Optional[str | Path],
               cache_dir: Optional[str | Path], train: bool) -> tuple[Any, Any, Items]:
        from ..data.release import cache_root
        from ..models.slice.features import SliceFeatureCache
        from ..models.slice.modeling_slice import preprocess_slice_features, slice_config_of

        cfg = slice_config_of(model)
        cache = SliceFeatureCache.for_model(cache_root(data_dir, cache_dir) / "slice_features", model, cfg)
        # Training stops at an unusable item (the release needs fixing); predict lists it and goes on.
        samples = release_samples(data_dir, split, images, skipped=None if train else [])
        if not all(cache.has(s.image_path) for s in samples):
            # A fresh model from the same base checkpoint has the same vision weights, hence the same keys.
            preprocess_slice_features(data_dir, cfg, cache_dir=cache.dir, splits=[split], images=images)
        kept = [s for s in samples if cache.has(s.image_path)]
        if len(kept) < len(samples):
            logger.warning("%s: %d of %d %s samples have no cached vision features (see %s) and are left out",
                           data_dir, len(samples) - len(kept), len(samples), split, cache.dir)
        return cfg, cache, Items(kept)

    def train_data(self, exp: "ExperimentConfig", model: nn.Module, processor: Any) -> tuple[Dataset, Collate]:
        from ..models.slice.processing_slice import SliceCollator

        cfg, cache, items = self._items(model, exp.train.data_dir, exp.train.split, exp.data.images,
                                        exp.data.cache_dir, train=True)
        return items, SliceCollator(processor, cfg, cache, train=True)

    def predict_data(self, model: nn.Module, processor: Any, data_dir: str | Path, split: str,
                     images: Optional[str | Path] = None,
                     cache_dir: Optional[str | Path] = None) -> tuple[Dataset, PredictCollate]:
        from ..models.slice.processing_slice import SliceCollator

        cfg, cache, items = self._items(model, data_dir, split, images, cache_dir, train=False)
        return items, slice_predict_collate(SliceCollator(processor, cfg, cache, train=False))

    def decode(self, model: nn.Module, processor: Any, generated: torch.Tensor,
               orig_shapes: Sequence[Sequence[int]]) -> list[str]:
        from ..boxes import coord_tokens_to_text
        from ..models.chat import decode_answer
        bins = self.num_bins(model)
        return [coord_tokens_to_text(decode_answer(processor.tokenizer, row.tolist()), shape, bins)
                for row, shape in zip(generated, orig_shapes)]

    def num_bins(self, model: nn.Module) -> int:
        from ..models.slice.modeling_slice import slice_config_of
        return slice_config_of(model).num_bins

    def processor_visual_tokens(self, exp: "ExperimentConfig", lm_dir: str | Path, volume: Any, prompt: str) -> int:
        from transformers import AutoProcessor

        from ..constants import VIDEO_PAD
        from ..models.slice.processing_slice import configure_processor, video_processor_kwargs, volume_to_frames

        processor = configure_processor(AutoProcessor.from_pretrained(lm_dir), exp.model)
        chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        out = processor(text=[text], videos=[volume_to_frames(volume, exp.model)], return_tensors="pt",
                        **video_processor_kwargs(exp.model))
        return int((out["input_ids"] == processor.tokenizer.convert_tokens_to_ids(VIDEO_PAD)).sum())

    def file_batch(self, model: nn.Module, processor: Any, volume_path: str | Path, prompt: str,
                   knee_side: Optional[str] = None) -> tuple[dict[str, Any], None]:
        from ..models.slice.modeling_slice import slice_config_of
        from ..models.slice.processing_slice import SliceCollator
        sample = _FileSample(f"{Path(volume_path).name}", Path(volume_path), 0, prompt, None)
        batch, _ = SliceCollator(processor, slice_config_of(model), None, train=False).collate([sample])
        return batch, None  # the slice baseline reads volumes as stored

    def example_batch(self, model: nn.Module, processor: Any, volume: Any, prompt: str, answer: str) -> dict[str, Any]:
        from ..data.release import Sample
        from ..models.slice.features import CachedFeatures
        from ..models.slice.modeling_slice import slice_config_of
        from ..models.slice.processing_slice import SliceCollator, encode_frames, volume_to_frames

        cfg = slice_config_of(model)
        grid = encode_frames(processor, [volume_to_frames(volume, cfg)], cfg)["video_grid_thw"][0]
        n = int(grid.prod()) // cfg.merge_size ** 2
        # Random features of the shape the frozen vision tower's merger writes to the cache: (N, LM hidden).
        feats = torch.randn(n, model.config.vision_config.out_hidden_size, generator=torch.Generator().manual_seed(0))
        entry = CachedFeatures(feats, grid, tuple(volume.shape))
        sample = Sample(sample_id="example", volume_id="example", patient_id="example", split="train",
                        image_path=Path("example.nii.gz"), mask_path=None, question_id=1, prompt=prompt,
                        answer=answer, severity={}, box=None, knee_side="right")
        return SliceCollator(processor, cfg, _OneEntry(entry), train=True)([sample])


@dataclass
class _FileSample:
    """The fields of ``data.release.Sample`` that ``SliceCollator`` reads."""
    sample_id: str
    image_path: Path
    question_id: int
    prompt: str
    box: Optional[list[int]]
    answer: str = ""


class _OneEntry:
    """Stands in for ``SliceFeatureCache``: every volume has the one given entry (no disk I/O)."""

    def __init__(self, entry: Any) -> None:
        self.entry = entry

    def load(self, image_path: Any) -> Any:
        return self.entry


def slice_predict_collate(collator: Any) -> PredictCollate:
    """A ``SliceCollator`` (train=False) as a predict collate: (batch, one SampleInfo per row)."""
    def collate(samples: list[Any]) -> tuple[dict[str, Any], list[SampleInfo]]:
        batch, shapes = collator.collate(samples)
        return batch, [SampleInfo(s.sample_id, s.question_id, tuple(shape), s.box is not None)
                       for s, shape in zip(samples, shapes)]
    return collate
