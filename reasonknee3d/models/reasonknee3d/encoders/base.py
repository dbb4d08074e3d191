"""The encoder registry of the 3D-native model: each encoder is a config class plus a model class.

An encoder turns a batch of single-channel volumes ``(B, C, S, H, W)`` into patch features
``(B, D*H*W, hidden_size)`` in grid order, together with that grid ``(D, H, W)``. Its config says, without
running anything, which grid a volume shape gives (``grid_for``), what every axis of an input must be a
multiple of (``input_multiple``) and how many features each patch has (``hidden_size``); the projector and
the processor count tokens from that alone. The model class names its repeated block in
``_no_split_modules``, which transformers collects into the full model's ``_no_split_modules``: device maps
and accelerate's FSDP auto-wrap (with no class list in its config) take the block from there.

Add an encoder with ``@register_encoder("name", NameEncoderConfig)`` on its ``PreTrainedModel`` class;
``model.encoder.encoder_type: name`` in an experiment then selects it. Nothing else changes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

Grid = tuple[int, int, int]


def triple(value: Any, name: str) -> list[int]:
    """An int or three ints -> three positive ints (one per array axis S, H, W)."""
    vals = (value,) * 3 if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(vals) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
        raise ValueError(f"{name} must be a positive int or three positive ints (S, H, W); got {value!r}")
    return list(vals)


class EncoderConfig(PreTrainedConfig):
    """Base of every encoder config: the input size and the output width every encoder has."""

    model_type = "reasonknee3d_encoder_base"
    base_config_key = "encoder_config"

    encoder_type: str = ""
    """Registry key (``register_encoder``); each config class fixes its own."""
    input_size: list[int] | tuple[int, ...] = (32, 64, 64)
    """Volume shape (S, H, W) the encoder is laid out for (set from ``data.input_shape``)."""
    in_channels: int = 1
    hidden_size: int = 64
    """Width of the output features (the projector's input)."""
    initializer_range: float = 0.02
    init_from: str | None = None
    """Encoder folder (``config.json`` + ``model.safetensors``, e.g. what ``train.stage: region_grades`` writes)
    whose weights a freshly built model starts from; read once at build time, never on reload."""

    def __post_init__(self, **kwargs: Any) -> None:
        self.input_size = triple(self.input_size, "encoder_config.input_size")
        bad = [(s, m) for s, m in zip(self.input_size, self.input_multiple) if s % m]
        if bad:
            raise ValueError(f"encoder_config.input_size {self.input_size} is not divisible by the "
                             f"{self.encoder_type} encoder's input multiple {list(self.input_multiple)} "
                             f"(axis size, multiple) {bad}")
        super().__post_init__(**kwargs)

    @property
    def input_multiple(self) -> tuple[int, int, int]:
        """Every input axis (and every region-look crop) must be a multiple of this."""
        raise NotImplementedError

    def grid_for(self, volume_shape: Sequence[int]) -> Grid:
        """Feature grid (D, H, W) the encoder returns for a volume of shape (S, H, W)."""
        raise NotImplementedError

    @property
    def grid_size(self) -> Grid:
        """Feature grid of a volume of ``input_size``."""
        return self.grid_for(self.input_size)


ENCODERS: dict[str, tuple[type[EncoderConfig], type[PreTrainedModel]]] = {}


def register_encoder(name: str, config_class: type[EncoderConfig]) -> Callable[[type[PreTrainedModel]], type[PreTrainedModel]]:
    """Class decorator: make ``name`` selectable as ``encoder_type`` (config class + model class)."""
    def add(model_class: type[PreTrainedModel]) -> type[PreTrainedModel]:
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} is already registered ({ENCODERS[name][1].__name__})")
        if config_class.encoder_type != name:
            raise ValueError(f"{config_class.__name__}.encoder_type is {config_class.encoder_type!r}, "
                             f"registered as {name!r}")
        ENCODERS[name] = (config_class, model_class)
        model_class.config_class = config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        return model_class
    return add


def _entry(encoder_type: str) -> tuple[type[EncoderConfig], type[PreTrainedModel]]:
    try:
        return ENCODERS[encoder_type]
    except KeyError:
        raise ValueError(f"encoder_config.encoder_type {encoder_type!r}: expected one of {sorted(ENCODERS)}") from None


def encoder_config(value: EncoderConfig | dict | None, strict: bool = False, default: str = "vit3d") -> EncoderConfig:
    """The config object of ``value`` (a mapping picks its class by ``encoder_type``, default ``default``).

    ``strict`` (experiment files): keys the chosen class does not declare are errors, since ``PreTrainedConfig``
    would keep them as attributes and a typo would be ignored silently. Saved ``config.json`` files also
    carry transformers' own keys, so loading is not strict.
    """
    if isinstance(value, EncoderConfig):
        return value
    values = dict(value or {})
    cls = _entry(values.pop("encoder_type", None) or default)[0]
    values.pop("model_type", None)
    if strict:
        own = sorted({k for c in cls.__mro__ if issubclass(c, EncoderConfig) for k in c.__annotations__})
        typos = sorted(set(values) - set(own))
        if typos:
            raise ValueError(f"encoder.{typos[0]}: unknown key for encoder {cls.encoder_type!r}; expected some of "
                             f"{['encoder_type', *[k for k in own if k != 'encoder_type']]}")
    return cls(**values)


def build_encoder(config: EncoderConfig) -> PreTrainedModel:
    """A freshly initialised encoder of ``config``'s registered type."""
    return _entry(config.encoder_type)[1]._from_config(config)


def init_encoder_from_files(encoder: PreTrainedModel) -> None:
    """Fill a freshly built encoder from the weight files its config names, if its class reads any.

    An encoder class that starts from files (``inflated_vit``'s ``init_from_2d``) defines ``init_from_files()``.
    The 3D model calls this once when it is built fresh (``from_qwen2_5_vl``), never in ``from_pretrained``: a
    saved model already holds the encoder's trained weights, and the files need not exist where it is loaded.
    """
    if encoder.config.init_from:
        # A pretrained encoder folder replaces any other start (it was itself built from those files).
        load_encoder_folder(encoder, encoder.config.init_from)
        return
    load = getattr(encoder, "init_from_files", None)
    if load is not None:
        load()


def load_encoder_folder(encoder: PreTrainedModel, path: str | os.PathLike) -> None:
    """Copy the weights of a saved encoder folder into ``encoder``: same ``encoder_type``, every tensor present
    with the same shape (ValueError naming the folder and the tensor otherwise)."""
    import json

    from safetensors.torch import load_file

    folder = Path(path)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"encoder.init_from: {folder} is not an encoder folder (expected config.json and "
                                f"model.safetensors, as train.stage region_grades writes)")
    saved_type = json.loads(config_path.read_text(encoding="utf-8")).get("encoder_type")
    if saved_type != encoder.config.encoder_type:
        raise ValueError(f"encoder.init_from: {folder} holds a {saved_type!r} encoder, the config builds "
                         f"{encoder.config.encoder_type!r}")
    weights = load_file(str(weights_path))
    own = encoder.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise ValueError(f"encoder.init_from: {folder} lacks encoder tensors {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    for key, value in own.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise ValueError(f"encoder.init_from: {folder}: {key} has shape {tuple(weights[key].shape)}, this encoder "
                             f"{tuple(value.shape)} (the encoder settings or data.input_shape differ from the saved "
                             f"encoder's)")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(weights[key].to(value.dtype))
