"""Family adapters: how the trainer and ``predict`` build, feed and decode each model family.

The trainer only talks to this interface, so both families share one training loop. Each adapter
wraps the family's own code (models, processors, data layer) and adds no model logic of its own.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError, ExperimentConfig, TrainConfig

logger = logging.getLogger(__name__)

Collate = Callable[[list[Any]], dict[str, Any]]
PredictCollate = Callable[[list[Any]], tuple[dict[str, Any], list["SampleInfo"]]]


class Family(abc.ABC):
    """Interface of a model family; ``predict`` and ``run_training`` use nothing else."""

    @property
    @abc.abstractmethod
    def model_class(self) -> type:
        """transformers model class of the family (``from_pretrained`` on a checkpoint folder)."""

    def validate_data_config(self, raw: dict[str, Any]) -> Any:
        """The ``data:`` section -> the data layer's PreprocessConfig (raises ConfigError)."""
        from ..data.transforms import PreprocessConfig
        try:
            return PreprocessConfig.from_dict(raw, where="data")
        except (TypeError, ValueError) as err:
            raise ConfigError(f"data: {err}") from None

    @abc.abstractmethod
    def validate_model_config(self, model: dict[str, Any], data: Any, train: TrainConfig) -> None:
        """Check the ``model:`` section and family-specific training constraints; raise ConfigError."""

    @abc.abstractmethod
    def build(self, exp: ExperimentConfig, attn_implementation: str) -> tuple[nn.Module, Any]:
        """A fresh (model, processor) from the experiment's ``model:`` and ``data:`` sections."""

    @abc.abstractmethod
    def load(self, model_dir: str | Path, attn_implementation: str) -> tuple[nn.Module, Any]:
        """(model, processor) from a ``save_pretrained`` folder (an embedded adapter is attached)."""

    @abc.abstractmethod
    def module_paths(self, model: nn.Module) -> dict[str, list[str]]:
        """Dotted module names per role: ``encoder``, ``projector``, ``language_model`` (incl. lm_head)."""

    @abc.abstractmethod
    def new_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        """Ids of tokens the family added to the tokenizer (their rows train with ``new_token_rows``)."""

    def coord_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        """``<|coord_0|>`` .. ``<|coord_{K-1}|>`` ids in bin order (ordinal targets of ``train.coord_label_sigma``)."""
        raise NotImplementedError(f"{type(self).__name__} has no coordinate tokens")

    @abc.abstractmethod
    def train_data(self, exp: ExperimentConfig, model: nn.Module, processor: Any) -> tuple[Dataset, Collate]:
        """(dataset over the preprocessing cache, collator producing padded batches with answer-only labels).

        Missing cache entries are filled first, so the data loader only ever reads the cache.
        """

    def train_lengths(self, dataset: Dataset) -> Optional[list[int]]:
        """Cheap relative sequence lengths for length-grouped batching (None: no grouping).

        Text length in characters is proportional to the token count; volume tokens are the same for
        every sample, so this orders samples like their tokenized lengths without loading anything.
        """
        samples = getattr(dataset, "samples", None)
        if samples is None:
            return None
        return [len(s.prompt) + len(s.answer or "") for s in samples]

    @abc.abstractmethod
    def predict_data(self, model: nn.Module, processor: Any, data_dir: str | Path,
                     split: str) -> tuple[Dataset, PredictCollate]:
        """(dataset of ``split``, collate: items -> (left-padded generation batch, one SampleInfo per row)).

        The dataset's ``samples`` (data-layer Samples, in item order) let ``predict`` skip finished ids and
        order the rest by prompt length without loading any item.
        """

    @abc.abstractmethod
    def decode(self, model: nn.Module, processor: Any, generated: torch.Tensor,
               orig_shapes: Sequence[Sequence[int]]) -> list[str]:
        """Generated ids (prompt removed) -> answer texts with voxel boxes of each original volume."""

    @abc.abstractmethod
    def num_bins(self, model: nn.Module) -> int:
        """Coordinate bins K of the model's box tokens."""


@dataclass(frozen=True)
class SampleInfo:
    """What ``predict`` needs to know about one row of a generation batch."""

    sample_id: str
    question_id: int
    orig_shape: tuple[int, int, int]
    has_box: bool
    """Whether the question asks for a region (its reference answer has a Location line)."""
    mirrored: bool = False
    """The model saw this volume mirrored along axis 0 (``canonical_side``): its boxes are mirrored back."""


class _Items(Dataset):
    """A list as a map-style Dataset; ``samples`` (data-layer Samples) feed ``train_lengths``."""

    def __init__(self, samples: Sequence[Any]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        return self.samples[index]


def _samples(data_dir: Optional[str | Path], split: str) -> list[Any]:
    """The split's samples of the release at ``data_dir`` (raises if there are none)."""
    from ..data.release import iter_samples
    if data_dir is None:
        raise ConfigError("train.data_dir: no release folder given (use --data DIR or train.data_dir=DIR)")
    samples = list(iter_samples(data_dir, split))
    if not samples:
        raise ValueError(f"{data_dir}: split {split!r} has no samples")
    return samples


class ReasonKnee3DFamily(Family):
    """The 3D-native model: volume encoder + projector + Qwen2.5-VL language model."""

    @property
    def model_class(self) -> type:
        from ..models.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration
        return ReasonKnee3DForConditionalGeneration

    def validate_model_config(self, model: dict[str, Any], data: Any, train: TrainConfig) -> None:
        from ..models.modeling_reasonknee3d import validate_model_section
        try:
            validate_model_section(model, data.input_shape)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model: {err}") from None
        if model.get("attn_implementation", "auto") not in ("auto", train.attn_implementation) \
                and train.attn_implementation != "auto":
            raise ConfigError(f"model.attn_implementation {model['attn_implementation']!r} contradicts "
                              f"train.attn_implementation {train.attn_implementation!r}; set one of them")

    def build(self, exp: ExperimentConfig, attn_implementation: str) -> tuple[nn.Module, Any]:
        from ..models.modeling_reasonknee3d import build_reasonknee3d
        return build_reasonknee3d({**exp.model, "attn_implementation": attn_implementation}, exp.data)

    def load(self, model_dir: str | Path, attn_implementation: str) -> tuple[nn.Module, Any]:
        from ..models.processing_reasonknee3d import ReasonKnee3DProcessor
        model = self.model_class.from_pretrained(model_dir, attn_implementation=attn_implementation)
        return model, ReasonKnee3DProcessor.from_pretrained(model_dir)

    def module_paths(self, model: nn.Module) -> dict[str, list[str]]:
        # The region look's projector (models/region.py) trains with the volume projector.
        region = ["model.region_projector"] if getattr(model.model, "region_projector", None) is not None else []
        return {"encoder": ["model.encoder"], "projector": ["model.projector", *region],
                "language_model": ["model.language_model", "lm_head"]}

    def new_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        # The coordinate tokens; <|volume_pad|> rows are replaced by volume features and never read.
        return self.coord_token_ids(model, processor)

    def coord_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        return list(model.config.coord_token_ids or [])

    def _dataset(self, data_dir: str | Path, split: str, prep: Any, train: bool) -> Dataset:
        from ..data.cache import VolumeCache, preprocess_release
        from ..data.dataset import VolumeQADataset
        from ..data.release import ReleaseLoader

        samples = _samples(data_dir, split)
        cache = VolumeCache(ReleaseLoader(data_dir).root / "cache" / "volumes", prep)
        if not all(cache.has(s.image_path) for s in samples):
            preprocess_release(data_dir, prep, splits=[split], cache_dir=cache.dir)
        kept = [s for s in samples if cache.has(s.image_path)]
        if len(kept) < len(samples):
            logger.warning("%s: %d of %d %s samples have no preprocessed volume (see %s) and are left out",
                           data_dir, len(samples) - len(kept), len(samples), split, cache.dir)
        return VolumeQADataset(kept, cache, train=train)

    def train_data(self, exp: ExperimentConfig, model: nn.Module, processor: Any) -> tuple[Dataset, Collate]:
        return (self._dataset(exp.train.data_dir, exp.train.split, exp.data, train=True),
                _VolumeBatcher(processor, with_answers=True))

    def predict_data(self, model: nn.Module, processor: Any, data_dir: str | Path,
                     split: str) -> tuple[Dataset, PredictCollate]:
        prep = processor.preprocess_config()  # the preprocessing its model was trained with
        batcher = _VolumeBatcher(processor, with_answers=False)

        def collate(items: list[dict[str, Any]]) -> tuple[dict[str, Any], list[SampleInfo]]:
            infos = [SampleInfo(it["sample_id"], int(it["question_id"]), tuple(it["orig_shape"]),
                                it["box"] is not None, bool(it["mirrored"])) for it in items]
            return batcher(items), infos
        return self._dataset(data_dir, split, prep, train=False), collate

    def decode(self, model: nn.Module, processor: Any, generated: torch.Tensor,
               orig_shapes: Sequence[Sequence[int]]) -> list[str]:
        return processor.batch_decode(generated, orig_shapes=orig_shapes)

    def num_bins(self, model: nn.Module) -> int:
        return int(model.config.num_bins)


class _VolumeBatcher:
    """VolumeQADataset items -> processor batch (a class, not a closure, so DataLoader workers can pickle it)."""

    def __init__(self, processor: Any, with_answers: bool) -> None:
        self.processor, self.with_answers = processor, with_answers

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(self.processor([it["volume"] for it in items], [it["prompt"] for it in items],
                                   [it["answer"] for it in items] if self.with_answers else None,
                                   orig_shapes=[it["orig_shape"] for it in items]))


class SliceFamily(Family):
    """The paper's baseline: stock Qwen2.5-VL over sagittal slices, trained on cached vision features."""

    @property
    def model_class(self) -> type:
        from transformers import AutoModelForImageTextToText
        return AutoModelForImageTextToText

    def validate_data_config(self, raw: dict[str, Any]) -> Any:
        prep = super().validate_data_config(raw)
        if prep.canonical_side is not None:
            raise ConfigError("data.canonical_side: the slice baseline reads volumes as stored (its frame and "
                              "feature caches do not mirror); leave it unset for family slice")
        return prep

    def validate_model_config(self, model: dict[str, Any], data: Any, train: TrainConfig) -> None:
        from ..models.slice_baseline import SliceBaselineConfig, check_slice_train_config
        try:
            SliceBaselineConfig.from_dict(model, where="model")
            check_slice_train_config(train)
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from None

    def build(self, exp: ExperimentConfig, attn_implementation: str) -> tuple[nn.Module, Any]:
        from ..models.slice_baseline import build_slice_model
        return build_slice_model(exp.model, attn_implementation)

    def load(self, model_dir: str | Path, attn_implementation: str) -> tuple[nn.Module, Any]:
        from ..models.slice_baseline import load_slice_model
        return load_slice_model(model_dir, attn_implementation)

    def module_paths(self, model: nn.Module) -> dict[str, list[str]]:
        from ..models.slice_baseline import slice_module_paths
        return slice_module_paths(model)

    def new_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        return self.coord_token_ids(model, processor)  # the coordinate tokens are the only added rows

    def coord_token_ids(self, model: nn.Module, processor: Any) -> list[int]:
        from ..models.slice_baseline import new_token_ids, slice_config_of
        return new_token_ids(processor, slice_config_of(model))

    def _items(self, model: nn.Module, data_dir: str | Path, split: str) -> tuple[Any, Any, _Items]:
        from ..data.release import ReleaseLoader
        from ..models.slice_baseline import SliceFeatureCache, preprocess_slice_features, slice_config_of

        cfg = slice_config_of(model)
        cache = SliceFeatureCache.for_model(ReleaseLoader(data_dir).root / "cache" / "slice_features", model, cfg)
        samples = _samples(data_dir, split)
        if not all(cache.has(s.image_path) for s in samples):
            # A fresh model from the same base checkpoint has the same vision weights, hence the same keys.
            preprocess_slice_features(data_dir, cfg, cache_dir=cache.dir, splits=[split])
        kept = [s for s in samples if cache.has(s.image_path)]
        if len(kept) < len(samples):
            logger.warning("%s: %d of %d %s samples have no cached vision features (see %s) and are left out",
                           data_dir, len(samples) - len(kept), len(samples), split, cache.dir)
        return cfg, cache, _Items(kept)

    def train_data(self, exp: ExperimentConfig, model: nn.Module, processor: Any) -> tuple[Dataset, Collate]:
        from ..models.slice_baseline import SliceCollator

        cfg, cache, items = self._items(model, exp.train.data_dir, exp.train.split)
        return items, SliceCollator(processor, cfg, cache, train=True)

    def predict_data(self, model: nn.Module, processor: Any, data_dir: str | Path,
                     split: str) -> tuple[Dataset, PredictCollate]:
        from ..models.slice_baseline import SliceCollator

        cfg, cache, items = self._items(model, data_dir, split)
        collator = SliceCollator(processor, cfg, cache, train=False)

        def collate(samples: list[Any]) -> tuple[dict[str, Any], list[SampleInfo]]:
            batch, shapes = collator.collate(samples)
            return batch, [SampleInfo(s.sample_id, s.question_id, tuple(shape), s.box is not None)
                           for s, shape in zip(samples, shapes)]
        return items, collate

    def decode(self, model: nn.Module, processor: Any, generated: torch.Tensor,
               orig_shapes: Sequence[Sequence[int]]) -> list[str]:
        from ..boxes import coord_tokens_to_text
        from ..models.chat import decode_answer
        bins = self.num_bins(model)
        return [coord_tokens_to_text(decode_answer(processor.tokenizer, row.tolist()), shape, bins)
                for row, shape in zip(generated, orig_shapes)]

    def num_bins(self, model: nn.Module) -> int:
        from ..models.slice_baseline import slice_config_of
        return slice_config_of(model).num_bins


_FAMILIES: dict[str, Callable[[], Family]] = {"3d": ReasonKnee3DFamily, "slice": SliceFamily}


def get_family(name: str) -> Family:
    """The adapter for ``name`` (``3d`` or ``slice``)."""
    if name not in _FAMILIES:
        raise ConfigError(f"family: unknown model family {name!r}; expected one of {sorted(_FAMILIES)}")
    return _FAMILIES[name]()


def family_of_model_dir(model_dir: str | Path) -> Family:
    """The family of a saved model folder, from its config.json ``model_type`` (and slice settings)."""
    import json
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a model folder (checkpoint, final, merged "
                                f"or `reasonknee3d init` output)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    from ..models.slice_baseline import SLICE_CONFIG_ATTR
    if config.get("model_type") == "reasonknee3d":
        return ReasonKnee3DFamily()
    if SLICE_CONFIG_ATTR in config:
        return SliceFamily()
    raise ValueError(f"{config_path}: model_type {config.get('model_type')!r} is neither a ReasonKnee3D model nor a "
                     f"slice-baseline folder (config.{SLICE_CONFIG_ATTR})")
