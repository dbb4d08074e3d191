"""Family ``3d``: the 3D-native model (volume encoder + projector + Qwen2.5-VL language model)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError
from ..models.reasonknee3d.configuration_reasonknee3d import ReasonKnee3DModelArgs
from .registry import Collate, Family, PredictCollate, SampleInfo, register_family, release_samples

if TYPE_CHECKING:
    from .experiment import ExperimentConfig
    from ..data.frame import VolumeFrame

logger = logging.getLogger(__name__)


@register_family("3d")
class ReasonKnee3DFamily(Family):
    """The 3D-native model: volume encoder + projector + Qwen2.5-VL language model."""

    model_config_class = ReasonKnee3DModelArgs

    @property
    def model_class(self) -> type:
        from ..models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration
        return ReasonKnee3DForConditionalGeneration

    def check(self, exp: "ExperimentConfig") -> None:
        exp.model.from_qwen_kwargs(exp.data.input_shape)  # encoder / projector / region against the input size
        if exp.model.attn_implementation not in ("auto", exp.train.attn_implementation) \
                and exp.train.attn_implementation != "auto":
            raise ConfigError(f"model.attn_implementation {exp.model.attn_implementation!r} contradicts "
                              f"train.attn_implementation {exp.train.attn_implementation!r}; set one of them")

    def owns_model_dir(self, config: dict[str, Any]) -> bool:
        return config.get("model_type") == "reasonknee3d"

    def build(self, exp: "ExperimentConfig", attn_implementation: str) -> tuple[nn.Module, Any]:
        import dataclasses

        from ..models.reasonknee3d.modeling_reasonknee3d import build_reasonknee3d
        return build_reasonknee3d(dataclasses.replace(exp.model, attn_implementation=attn_implementation), exp.data)

    def load(self, model_dir: str | Path, attn_implementation: str) -> tuple[nn.Module, Any]:
        from ..models.reasonknee3d.processing_reasonknee3d import ReasonKnee3DProcessor
        from ..models.precision import restore_adapter_precision
        model = self.model_class.from_pretrained(model_dir, attn_implementation=attn_implementation)
        restore_adapter_precision(model, model_dir)  # what trained comes back float32, as it was saved
        return model, ReasonKnee3DProcessor.from_pretrained(model_dir)

    def preprocess(self, exp: "ExperimentConfig", data_dir: str | Path, splits: Sequence[str]) -> Any:
        from ..data.cache import preprocess_release
        return preprocess_release(data_dir, exp.data, splits, distributed=True)

    def num_visual_tokens(self, exp: "ExperimentConfig", volume_shape: Sequence[int]) -> int:
        # Every volume is resized to data.input_shape first, so the count does not depend on volume_shape.
        return exp.model.num_visual_tokens(exp.data.input_shape)

    def module_paths(self, model: nn.Module) -> dict[str, list[str]]:
        # The region look's projector (models/reasonknee3d/region.py) trains with the volume projector.
        region = ["model.region_projector"] if getattr(model.model, "region_projector", None) is not None else []
        return {"encoder": ["model.encoder"], "projector": ["model.projector", *region],
                "language_model": ["model.language_model", "lm_head"]}

    def new_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        # The coordinate tokens; <|volume_pad|> rows are replaced by volume features and never read.
        return self.coord_token_ids(model, processor)

    def coord_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        return list(model.config.coord_token_ids or [])

    def _dataset(self, data_dir: str | Path, split: str, prep: Any, train: bool,
                 augment_per_volume: bool = False) -> Dataset:
        from ..data.cache import VolumeCache, preprocess_release
        from ..data.dataset import VolumeQADataset
        from ..data.release import cache_root

        # Training stops at an unusable item (the release needs fixing); predict lists it and goes on.
        samples = release_samples(data_dir, split, prep.images, skipped=None if train else [])
        cache = VolumeCache(cache_root(data_dir, prep.cache_dir) / "volumes", prep)
        if not all(cache.has(s.image_path) for s in samples):
            preprocess_release(data_dir, prep, splits=[split], cache_dir=cache.dir)
        kept = [s for s in samples if cache.has(s.image_path)]
        if len(kept) < len(samples):
            logger.warning("%s: %d of %d %s samples have no preprocessed volume (see %s) and are left out",
                           data_dir, len(samples) - len(kept), len(samples), split, cache.dir)
        return VolumeQADataset(kept, cache, train=train, augment_per_volume=augment_per_volume)

    def train_data(self, exp: "ExperimentConfig", model: nn.Module, processor: Any) -> tuple[Dataset, Collate]:
        # With volume grouping the augmentation is drawn per volume in the collator, so questions about one
        # volume keep one input and the encoder runs once for them; without it, per item as always.
        grouping = exp.train.volume_grouping > 1
        dataset = self._dataset(exp.train.data_dir, exp.train.split, exp.data, train=True,
                                augment_per_volume=grouping)
        return dataset, _VolumeBatcher(processor, with_answers=True, group_volumes=grouping,
                                       augment=dataset.volume_augment)

    def predict_data(self, model: nn.Module, processor: Any, data_dir: str | Path, split: str,
                     images: Optional[str | Path] = None,
                     cache_dir: Optional[str | Path] = None) -> tuple[Dataset, PredictCollate]:
        import dataclasses
        # The preprocessing its model was trained with; where the data is comes from the caller.
        prep = dataclasses.replace(processor.preprocess_config(), images=None if images is None else str(images),
                                   cache_dir=None if cache_dir is None else str(cache_dir))
        batcher = _VolumeBatcher(processor, with_answers=False)

        def collate(items: list[dict[str, Any]]) -> tuple[dict[str, Any], list[SampleInfo]]:
            infos = [SampleInfo(it["sample_id"], int(it["question_id"]), tuple(it["orig_shape"]),
                                it["box"] is not None, it["frame"]) for it in items]
            return batcher(items), infos
        return self._dataset(data_dir, split, prep, train=False), collate

    def decode(self, model: nn.Module, processor: Any, generated: torch.Tensor,
               orig_shapes: Sequence[Sequence[int]]) -> list[str]:
        return processor.batch_decode(generated, orig_shapes=orig_shapes)

    def num_bins(self, model: nn.Module) -> int:
        return int(model.config.num_bins)

    def processor_visual_tokens(self, exp: "ExperimentConfig", lm_dir: str | Path, volume: Any, prompt: str) -> int:
        from transformers import AutoTokenizer

        from ..constants import VOLUME_PAD
        from ..models.reasonknee3d.processing_reasonknee3d import ReasonKnee3DProcessor
        from ..models.tokens import add_box_tokens

        tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        add_box_tokens(tokenizer, exp.model.num_bins, extra=(VOLUME_PAD,))
        processor = ReasonKnee3DProcessor(tokenizer, volume_size=list(exp.data.input_shape),
                                          num_visual_tokens=self.num_visual_tokens(exp, volume.shape),
                                          num_bins=exp.model.num_bins)
        ids = processor([_standardized(volume)], [prompt])["input_ids"]
        return int((ids == tokenizer.convert_tokens_to_ids(VOLUME_PAD)).sum())

    def file_batch(self, model: nn.Module, processor: Any, volume_path: str | Path, prompt: str,
                   knee_side: Optional[str] = None) -> tuple[dict[str, Any], Optional["VolumeFrame"]]:
        from ..data.transforms import preprocess_volume_frame
        model_input, frame = preprocess_volume_frame(volume_path, processor.preprocess_config(), knee_side)
        batch = dict(processor([model_input], [prompt], orig_shapes=[frame.stored_shape]))
        return batch, frame

    def example_batch(self, model: nn.Module, processor: Any, volume: Any, prompt: str, answer: str) -> dict[str, Any]:
        # ``volume`` is at the model's input size; z-scored as the default preprocessing leaves it.
        return dict(processor([_standardized(volume)], [prompt], [answer]))


def _standardized(volume: Any) -> torch.Tensor:
    v = torch.as_tensor(volume, dtype=torch.float32)
    return (v - v.mean()) / v.std().clamp_min(1e-6)


class _VolumeBatcher:
    """VolumeQADataset items -> processor batch (a class, not a closure, so DataLoader workers can pickle it).

    ``augment`` (``data.dataset.VolumeAugment``, for un-augmented training items): one augmentation drawn per
    distinct volume of the batch, and with ``group_volumes`` the rows are grouped by the volume they ask about.
    Without it ``group_volumes`` merges rows whose inputs are equal (``group_volumes``).
    """

    def __init__(self, processor: Any, with_answers: bool, group_volumes: bool = False, augment: Any = None) -> None:
        self.processor, self.with_answers, self.group_volumes = processor, with_answers, group_volumes
        self.augment = augment

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        index = None
        if self.augment is not None:
            items, index = self.augment(items)
        batch = dict(self.processor([it["volume"] for it in items], [it["prompt"] for it in items],
                                    [it["answer"] for it in items] if self.with_answers else None,
                                    orig_shapes=[it["orig_shape"] for it in items]))
        if not self.group_volumes:
            return batch
        return group_volumes(batch) if index is None else indexed_volumes(batch, index)


def indexed_volumes(batch: dict[str, Any], index: list[int]) -> dict[str, Any]:
    """``batch`` with volume ``k`` once in ``volumes`` (from its first row) and ``volume_index`` = ``index``, the
    volume of each row (numbered in order of first appearance); a batch of distinct volumes is returned as is."""
    if len(set(index)) == len(index):
        return batch
    first = [index.index(k) for k in range(max(index) + 1)]
    return {**batch, "volumes": batch["volumes"][first], "volume_index": torch.tensor(index, dtype=torch.long)}


def group_volumes(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with each distinct volume once in ``volumes`` and ``volume_index`` (B,) pointing rows at them.

    Rows are merged only when their model inputs are identical (the same cached volume and the same augmentation
    draw, or none), so the batch means exactly what it meant before; a batch without repeats is returned as is.
    """
    volumes = batch["volumes"]
    distinct: list[int] = []
    index = []
    for row in range(volumes.shape[0]):
        same = next((k for k, d in enumerate(distinct) if torch.equal(volumes[d], volumes[row])), None)
        if same is None:
            distinct.append(row)
            same = len(distinct) - 1
        index.append(same)
    if len(distinct) == volumes.shape[0]:
        return batch
    return {**batch, "volumes": volumes[distinct], "volume_index": torch.tensor(index, dtype=torch.long)}
