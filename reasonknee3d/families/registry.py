"""The model-family registry: how the commands, the trainer and ``predict`` build, feed and decode a family.

Everything above this package (``cli``, ``demo``, ``bench``, ``training``, ``evaluation``) talks to this
interface only, so both families share one training loop and one generation path. Each family wraps its
model package (``models/<name>/``) and the data layer and adds no model logic of its own.
"""
from __future__ import annotations

import abc
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError
from ..data.frame import VolumeFrame
from ..data.transforms import PreprocessConfig

if TYPE_CHECKING:
    from .experiment import ExperimentConfig

logger = logging.getLogger(__name__)

Collate = Callable[[list[Any]], dict[str, Any]]
PredictCollate = Callable[[list[Any]], tuple[dict[str, Any], list["SampleInfo"]]]


class Family(abc.ABC):
    """One model family: everything the commands, the trainer and ``predict`` need to know about it.

    A family names the dataclasses of its experiment sections, builds, saves and loads its models, fills its
    caches, counts its visual tokens, and feeds and decodes its batches. Nothing outside this package branches
    on a family's name.
    """

    name: ClassVar[str] = ""
    """Registry key, the ``family:`` value of an experiment file (set by ``register_family``)."""
    model_config_class: ClassVar[type]
    """Dataclass of the ``model:`` section."""
    data_config_class: ClassVar[type] = PreprocessConfig
    """Dataclass of the ``data:`` section."""

    @property
    @abc.abstractmethod
    def model_class(self) -> type:
        """transformers model class of the family (``from_pretrained`` on a checkpoint folder)."""

    def check(self, exp: "ExperimentConfig") -> None:
        """Checks across sections (e.g. which modules may train); raise ConfigError naming the keys."""

    @abc.abstractmethod
    def owns_model_dir(self, config: dict[str, Any]) -> bool:
        """Whether a saved folder's ``config.json`` (as a mapping) is a model of this family."""

    @abc.abstractmethod
    def build(self, exp: "ExperimentConfig", attn_implementation: str) -> tuple[nn.Module, Any]:
        """A fresh (model, processor) from the experiment's ``model:`` and ``data:`` sections."""

    def init(self, exp: "ExperimentConfig", out_dir: str | Path, overwrite: bool = False) -> Path:
        """``reasonknee3d init``: write an untrained model + processor folder (no adapter: the trainer adds
        LoRA), atomically. ``out_dir`` must be new or empty, or hold an earlier ``init`` output
        (``io_utils.OUTPUT_MARKER``) and ``overwrite`` be set; anything else raises ``io_utils.OutputDirError``
        before any work."""
        from ..io_utils import check_output_dir, output_marker
        from ..models import save_model_dir
        settings = {"family": exp.family, "data": exp.to_dict()["data"], "model": exp.to_dict()["model"]}
        check_output_dir(out_dir, "init", overwrite, settings)
        return save_model_dir(*self.build(exp, "auto"), out_dir, marker=output_marker("init", settings))

    @abc.abstractmethod
    def load(self, model_dir: str | Path, attn_implementation: str) -> tuple[nn.Module, Any]:
        """(model, processor) from a ``save_pretrained`` folder (an embedded adapter is attached)."""

    @abc.abstractmethod
    def preprocess(self, exp: "ExperimentConfig", data_dir: str | Path, splits: Sequence[str]) -> Any:
        """Fill the family's cache for ``splits`` of the release (``reasonknee3d preprocess``) under
        ``exp.data.cache_dir`` (default ``<release>/cache``), volumes found through ``exp.data.images`` when the
        written paths do not exist; returns the data layer's ``BatchResult`` (done, skipped with reasons).
        Under torchrun / accelerate launch every process calls this and they split the volumes between them
        (``data.cache.fill_volume_cache(distributed=True)``)."""

    @abc.abstractmethod
    def num_visual_tokens(self, exp: "ExperimentConfig", volume_shape: Sequence[int]) -> int:
        """Language-model tokens one volume of ``volume_shape`` (S, H, W) becomes, from the config alone."""

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
    def train_data(self, exp: "ExperimentConfig", model: nn.Module, processor: Any) -> tuple[Dataset, Collate]:
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
    def predict_data(self, model: nn.Module, processor: Any, data_dir: str | Path, split: str,
                     images: Optional[str | Path] = None,
                     cache_dir: Optional[str | Path] = None) -> tuple[Dataset, PredictCollate]:
        """(dataset of ``split``, collate: items -> (left-padded generation batch, one SampleInfo per row)).

        The dataset's ``samples`` (data-layer Samples, in item order) let ``predict`` skip finished ids and
        order the rest by prompt length without loading any item. Items the release reader cannot use are left
        out (``predict`` lists them); ``images`` / ``cache_dir`` as in ``data.images`` / ``data.cache_dir``.
        """

    @abc.abstractmethod
    def decode(self, model: nn.Module, processor: Any, generated: torch.Tensor,
               orig_shapes: Sequence[Sequence[int]]) -> list[str]:
        """Generated ids (prompt removed) -> answer texts with voxel boxes of each original volume."""

    @abc.abstractmethod
    def num_bins(self, model: nn.Module) -> int:
        """Coordinate bins K of the model's box tokens."""

    @abc.abstractmethod
    def processor_visual_tokens(self, exp: "ExperimentConfig", lm_dir: str | Path, volume: Any, prompt: str) -> int:
        """Visual tokens in the ``input_ids`` the family's processor writes for ``volume`` (S, H, W) and ``prompt``,
        with the tokenizer / processor files of the Qwen checkpoint ``lm_dir`` (no weights are read)."""

    @abc.abstractmethod
    def file_batch(self, model: nn.Module, processor: Any, volume_path: str | Path, prompt: str,
                   knee_side: Optional[str] = None) -> tuple[dict[str, Any], Optional[VolumeFrame]]:
        """(one-sample generation batch from a NIfTI file, the volume's model frame or None when the model sees it
        as stored), for ``infer``: the volume is read and prepared as the model was trained, without any cache;
        ``frame.text_to_stored`` takes the generated boxes back to the stored voxels."""

    @abc.abstractmethod
    def example_batch(self, model: nn.Module, processor: Any, volume: Any, prompt: str, answer: str) -> dict[str, Any]:
        """A one-sample training batch from an in-memory volume ``(S, H, W)`` (for ``bench``), built as the
        family's training collator builds it; cached inputs are computed or stood in for without disk I/O."""


@dataclass(frozen=True)
class SampleInfo:
    """What ``predict`` needs to know about one row of a generation batch."""

    sample_id: str
    question_id: int
    orig_shape: tuple[int, int, int]
    has_box: bool
    """Whether the question asks for a region (its reference answer has a Location line)."""
    frame: Optional[VolumeFrame] = None
    """The volume's model frame (``data.frame.VolumeFrame``: mirrored into ``canonical_side``, moved by ``recentre``);
    the boxes the model writes go back to the stored voxels through it. None: the volume was seen as stored."""

    @property
    def mirrored(self) -> bool:
        """The model saw this volume mirrored along axis 0 (``canonical_side``)."""
        return self.frame is not None and self.frame.mirrored


class Items(Dataset):
    """A list as a map-style Dataset; ``samples`` (data-layer Samples) feed ``train_lengths``."""

    def __init__(self, samples: Sequence[Any]) -> None:
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        return self.samples[index]


def release_samples(data_dir: Optional[str | Path], split: str, images: Optional[str | Path] = None,
                    skipped: Optional[list[Any]] = None) -> list[Any]:
    """The split's samples of the release at ``data_dir`` (raises if there are none). With ``skipped`` (a list),
    unusable items are appended to it instead of raising."""
    from ..data.release import iter_samples
    if data_dir is None:
        raise ConfigError("train.data_dir: no release folder given (use --data DIR or train.data_dir=DIR)")
    samples = list(iter_samples(data_dir, split, skipped, images=images))
    if not samples:
        raise ValueError(f"{data_dir}: split {split!r} has no samples")
    return samples


_FAMILIES: dict[str, type[Family]] = {}


def register_family(name: str) -> Callable[[type[Family]], type[Family]]:
    """Class decorator: make a Family subclass the ``family: name`` of experiment files."""
    def add(cls: type[Family]) -> type[Family]:
        if name in _FAMILIES:
            raise ValueError(f"model family {name!r} is already registered ({_FAMILIES[name].__name__})")
        cls.name = name
        _FAMILIES[name] = cls
        return cls
    return add


def family_names() -> list[str]:
    return sorted(_FAMILIES)


def get_family(name: Any) -> Family:
    """The family registered as ``name``."""
    if name not in _FAMILIES:
        raise ConfigError(f"family: unknown model family {name!r}; expected one of {family_names()}")
    return _FAMILIES[name]()


def family_of_model_dir(model_dir: str | Path) -> Family:
    """The family of a saved model folder, from its ``config.json``."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a model folder (checkpoint, final, merged "
                                f"or `reasonknee3d init` output)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    for cls in _FAMILIES.values():
        family = cls()
        if family.owns_model_dir(config):
            return family
    raise ValueError(f"{config_path}: model_type {config.get('model_type')!r} is not a model of any family "
                     f"({', '.join(family_names())})")
