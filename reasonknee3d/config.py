"""Configuration building blocks, below everything else in the package.

Every YAML section (``data``, ``model``, ``train``) is a dataclass; ``from_mapping`` builds any of them from a
parsed mapping, rejecting unknown keys and values of the wrong type with an error that names the dotted key.
The dataclasses' ``__post_init__`` then check what types cannot say (ranges, combinations) and raise
``ValueError`` / ``ConfigError``. The experiment loader (``reasonknee3d.families.experiment``) puts the sections
together; ``TrainConfig`` (how to train, the same for every family) lives here.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import yaml

from .attention import ATTN_IMPLEMENTATIONS

STAGES = ("alignment", "instruction", "region_grades", "segmentation")
ENCODER_STAGES = ("region_grades", "segmentation")
"""Stages that pretrain the 3D model's volume encoder on its own (``training/pretrain.py``)."""
MODULE_ROLES = ("encoder", "projector", "language_model")
MODES = ("frozen", "lora", "full")

# What each stage trains when the config leaves a module's mode unset (None).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "alignment": {"encoder": "full", "projector": "full", "language_model": "frozen", "new_token_rows": False},
    "instruction": {"encoder": "frozen", "projector": "full", "language_model": "lora", "new_token_rows": True},
    # Encoder pretraining on its own (training/pretrain.py): no projector or language model is built.
    "region_grades": {"encoder": "full", "projector": "frozen", "language_model": "frozen", "new_token_rows": False},
    "segmentation": {"encoder": "full", "projector": "frozen", "language_model": "frozen", "new_token_rows": False},
}
ROI_MODES = ("crop", "grid")


def _is_real(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ConfigError(ValueError):
    """A configuration value is unknown, malformed or contradicts another one."""


@dataclass
class LoraSettings:
    """LoRA on the language model (peft); only used where a module's mode is ``lora``."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """Scaling numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_proj", "up_proj", "down_proj"])
    """Linear layer names inside the language model that get LoRA (never the vision/volume encoder)."""


@dataclass
class PretrainSettings:
    """Settings of the encoder pretraining stages (``train.stage: region_grades | segmentation``)."""

    roi: str = "crop"
    """region_grades: what the grade heads see of a question's box. crop: the box's part of the volume resampled
    to ``crop_size`` and encoded on its own (the input the 3D model's region look gives the same encoder), mean
    and max pooled; grid: the mean of the whole-volume features of the grid cells the box overlaps (one encoder
    forward per volume, but a small lesion is a fraction of a cell)."""
    crop_size: Optional[list[int]] = None
    """region_grades, roi crop: (S, H, W) every box is resampled to; unset takes ``model.region_size``."""
    rois_per_volume: int = 8
    """region_grades, roi crop: questions drawn per volume and step (each is one encoder forward); 0 = all."""
    class_balance: float = 0.0
    """region_grades: power p of the class weights of each head's cross-entropy, (grade frequency)^-p in the
    training split, scaled to average 1 over the targets: 0 = plain cross-entropy, 1 = every grade counts equally
    (which is what balanced accuracy rewards)."""
    num_labels: Optional[int] = None
    """segmentation: mask labels including background 0; unset = the largest label in the split's masks + 1."""
    dice_weight: float = 1.0
    """segmentation: weight of the Dice loss beside the cross-entropy (MONAI ``DiceCELoss``)."""

    def __post_init__(self) -> None:
        if self.roi not in ROI_MODES:
            raise ConfigError(f"train.pretrain.roi: expected one of {ROI_MODES}, got {self.roi!r}")
        if self.crop_size is not None and (len(self.crop_size) != 3 or any(
                not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in self.crop_size)):
            raise ConfigError(f"train.pretrain.crop_size: expected three integers >= 1 (S, H, W), got {self.crop_size!r}")
        if not isinstance(self.rois_per_volume, int) or self.rois_per_volume < 0:
            raise ConfigError(f"train.pretrain.rois_per_volume: expected an integer >= 0, got {self.rois_per_volume!r}")
        if not (_is_real(self.class_balance) and self.class_balance >= 0):
            raise ConfigError(f"train.pretrain.class_balance: expected a power >= 0, got {self.class_balance!r}")
        if self.num_labels is not None and (not isinstance(self.num_labels, int) or self.num_labels < 2):
            raise ConfigError(f"train.pretrain.num_labels: expected an integer >= 2 (background and one label), "
                              f"got {self.num_labels!r}")
        if not (_is_real(self.dice_weight) and self.dice_weight >= 0):
            raise ConfigError(f"train.pretrain.dice_weight: expected a number >= 0, got {self.dice_weight!r}")


@dataclass
class TrainConfig:
    """How to train: stage and per-module modes, optimisation, logging, checkpoints, runtime."""

    stage: str = "instruction"
    """alignment (encoder + projector train, language model frozen) | instruction (LoRA on the LM,
    projector and new token rows train) | region_grades (the 3D encoder alone learns the MOAKS grades inside each
    reference box; ``training/region_grades.py``) | segmentation (the 3D encoder alone learns the release's
    masks; ``training/segmentation.py``). The last two write an encoder folder for ``model.encoder.init_from``."""
    encoder: Optional[str] = None
    """Volume/vision encoder mode: frozen | full; unset takes the stage default."""
    projector: Optional[str] = None
    """Projector mode: frozen | full; unset takes the stage default."""
    language_model: Optional[str] = None
    """Language model mode: frozen | lora | full; unset takes the stage default."""
    new_token_rows: Optional[bool] = None
    """Train the embedding / lm_head rows of added tokens (coordinate tokens); needs language_model=lora."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings for modules in ``lora`` mode."""
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    """Settings of the encoder pretraining stages (region_grades, segmentation)."""

    data_dir: Optional[str] = None
    """Release root (as written by ``synth`` or the real 3DReasonKnee layout); ``--data`` sets it."""
    split: str = "train"
    """Split to train on."""
    output_dir: Optional[str] = None
    """Run folder (checkpoints, metrics.jsonl, tensorboard); unset means runs/<config file stem>."""

    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: str = "cosine"
    """transformers scheduler name (linear, cosine, constant, constant_with_warmup, ...)."""
    warmup_ratio: float = 0.03
    """Fraction of the total steps spent in linear warmup, in [0, 1)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    per_device_batch_size: int = 1
    """Samples per device per forward pass."""
    gradient_accumulation_steps: int = 1
    """Forward passes per optimizer step."""
    max_steps: int = -1
    """Optimizer steps; -1 trains for ``num_epochs``."""
    num_epochs: float = 1.0
    """Epochs when ``max_steps`` is -1."""
    seed: int = 42
    """Seed for model init, data order and dropout (transformers.set_seed)."""

    logging_steps: int = 10
    """Optimizer steps between log lines (metrics.jsonl, tensorboard, progress bar)."""
    save_steps: int = 500
    """Optimizer steps between checkpoints."""
    save_total_limit: int = 2
    """Checkpoints kept in output_dir (older ones are deleted)."""
    resume: str = "auto"
    """auto: continue from the last checkpoint-N in output_dir | never | a checkpoint path."""
    merge: bool = False
    """After training, also write <output_dir>/merged with LoRA merged into the weights."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """transformers logging integrations."""

    bf16: Any = "auto"
    """auto (bf16 autocast where the device supports it, else fp32) | true | false."""
    activation_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    attn_implementation: str = "auto"
    """auto | sdpa | eager | flash_attention_2 (auto picks flash_attention_2 only where it can run)."""
    group_by_length: bool = False
    """Batch sequences of similar length together so dynamic padding wastes little. Off by default: in
    ReasonKnee the length follows the question, so grouped batches hold one or two question types and
    transformers' sampler serves them longest-first within each mega-batch. That non-i.i.d. order slowed the
    tiny 3D model several-fold (training loss 1.0 at step 400 grouped vs 0.35 at step 280 shuffled, same
    run otherwise). At batch size 1 (the real configs, with gradient accumulation) there is no padding."""
    dataloader_num_workers: int = 2
    """Worker processes feeding batches (0 loads in the training process)."""
    grade_balance: float = 0.0
    """Power p of grade-balanced sampling (``training.sampling``): 0 draws samples in their natural mix, 1 draws
    every grade of a (category, field) group equally often, in between interpolates. Trades diag_exact for
    balanced_acc; the mix of question categories is kept either way."""
    volume_grouping: int = 1
    """Questions of the same volume placed next to each other in the sample order, in groups of up to this many
    (``training.sampling.VolumeGroupedSampler``); a batch then holds fewer distinct volumes and the 3D model
    encodes each once (``volume_index``). 1 = off. Needs ``per_device_batch_size`` > 1 to save anything. With
    grouping the training augmentation is drawn once per volume of a batch (``data.dataset.VolumeAugment``: one
    zoom and intensity draw moves the volume and every row's box), not per question, so grouped rows share one
    input also with ``data.augment_prob`` > 0."""
    coord_label_sigma: float = 0.0
    """Gaussian width, in bins, of the coordinate-token targets (``training.losses``): near-miss bins share the
    target mass, so the ordinal box coordinates learn from fewer samples. 0 = plain cross-entropy."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = from_mapping(LoraSettings, self.lora, "train.lora")
        if isinstance(self.pretrain, dict):
            self.pretrain = from_mapping(PretrainSettings, self.pretrain, "train.pretrain")
        self.validate()

    def validate(self) -> None:
        """Fill unset modes from the stage and reject contradictory settings (raises ConfigError)."""
        if self.stage not in STAGES:
            raise ConfigError(f"train.stage: expected one of {STAGES}, got {self.stage!r}")
        for key, default in STAGE_DEFAULTS[self.stage].items():
            if getattr(self, key) is None:
                setattr(self, key, default)
        for role in MODULE_ROLES:
            mode = getattr(self, role)
            if mode not in MODES:
                raise ConfigError(f"train.{role}: expected one of {MODES}, got {mode!r}")
            if mode == "lora" and role != "language_model":
                raise ConfigError(f"train.{role}: LoRA is applied to the language model only; use frozen or full")
        if self.stage == "alignment" and self.language_model != "frozen":
            raise ConfigError(f"train.language_model: the alignment stage keeps the language model frozen, got "
                              f"{self.language_model!r} (use stage: instruction)")
        if self.stage in ENCODER_STAGES and (self.encoder, self.projector, self.language_model) != (
                "full", "frozen", "frozen"):
            raise ConfigError(f"train: the {self.stage} stage trains the encoder alone (encoder full, projector and "
                              f"language_model frozen); got encoder {self.encoder!r}, projector {self.projector!r}, "
                              f"language_model {self.language_model!r}")
        if not isinstance(self.new_token_rows, bool):
            raise ConfigError(f"train.new_token_rows: expected true or false, got {self.new_token_rows!r}")
        if self.new_token_rows and self.language_model != "lora":
            raise ConfigError("train.new_token_rows: true needs train.language_model: lora (full already trains "
                              f"every row, frozen trains none), got language_model {self.language_model!r}")
        if self.modes() == {role: "frozen" for role in MODULE_ROLES} and not self.new_token_rows:
            raise ConfigError("train: every module is frozen, nothing would train")
        if self.language_model == "lora":
            if self.lora.r < 1 or not self.lora.targets:
                raise ConfigError(f"train.lora: language_model is lora but r={self.lora.r}, "
                                  f"targets={self.lora.targets} (need r >= 1 and at least one target)")
        if not isinstance(self.volume_grouping, int) or self.volume_grouping < 1:
            raise ConfigError(f"train.volume_grouping: expected an integer >= 1, got {self.volume_grouping!r}")
        if self.volume_grouping > 1 and (self.grade_balance > 0 or self.group_by_length):
            raise ConfigError("train.volume_grouping: > 1 picks the sample order, so it cannot be combined with "
                              "train.grade_balance > 0 or train.group_by_length: true")
        if self.merge and self.language_model != "lora":
            raise ConfigError("train.merge: true needs train.language_model: lora (there is no adapter to merge)")
        if self.max_steps == 0 or self.max_steps < -1 or (self.max_steps == -1 and self.num_epochs <= 0):
            raise ConfigError(f"train.max_steps / train.num_epochs: need max_steps >= 1, or max_steps -1 with "
                              f"num_epochs > 0; got {self.max_steps} / {self.num_epochs}")
        for key in ("per_device_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                    "save_total_limit"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: expected an integer >= 1, got {getattr(self, key)!r}")
        self._validate_numbers()
        if self.bf16 not in ("auto", True, False):
            raise ConfigError(f"train.bf16: expected auto, true or false, got {self.bf16!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"train.attn_implementation: expected one of {ATTN_IMPLEMENTATIONS}, "
                              f"got {self.attn_implementation!r}")
        if not (_is_real(self.grade_balance) and self.grade_balance >= 0):
            raise ConfigError(f"train.grade_balance: expected a power >= 0 (0 = natural mix, 1 = balanced), "
                              f"got {self.grade_balance!r}")
        if self.grade_balance > 0 and self.group_by_length:
            raise ConfigError("train.grade_balance and train.group_by_length both choose the sample order; "
                              "set one of them")
        if self.dataloader_num_workers < 0:
            raise ConfigError(f"train.dataloader_num_workers: expected >= 0, got {self.dataloader_num_workers}")

    def _validate_numbers(self) -> None:
        """Optimisation numbers must be finite and in range: an infinite or NaN learning rate trains to NaN
        weights without any error from torch, and a negative clipping norm or weight decay is silently misread."""
        checks = (("learning_rate", self.learning_rate, lambda v: v > 0, "> 0"),
                  ("warmup_ratio", self.warmup_ratio, lambda v: 0 <= v < 1, "in [0, 1)"),
                  ("weight_decay", self.weight_decay, lambda v: v >= 0, ">= 0"),
                  ("max_grad_norm", self.max_grad_norm, lambda v: v >= 0, ">= 0 (0 turns clipping off)"),
                  ("num_epochs", self.num_epochs, lambda v: v > 0, "> 0"),
                  ("coord_label_sigma", self.coord_label_sigma, lambda v: v >= 0, ">= 0 (a width in bins)"),
                  ("lora.dropout", self.lora.dropout, lambda v: 0 <= v < 1, "in [0, 1)"),
                  ("lora.alpha", self.lora.alpha, lambda v: v > 0, "> 0"))
        for key, value, in_range, expected in checks:
            if not (_is_real(value) and in_range(value)):
                raise ConfigError(f"train.{key}: expected a finite number {expected}, got {value!r}")

    def modes(self) -> dict[str, str]:
        """Mode per module role, e.g. ``{"encoder": "frozen", "projector": "full", "language_model": "lora"}``."""
        return {role: getattr(self, role) for role in MODULE_ROLES}


def plain(obj: Any) -> Any:
    """Tuples -> lists and paths -> strings so yaml.safe_dump writes plain YAML."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _check(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type hint ``hint``; numbers normalised (YAML reads ``2e-4`` as a string)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return _check(value, arm, where)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        return from_mapping(hint, value, where)
    if hint is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint in (int, str) and isinstance(value, hint) and not isinstance(value, bool):
        return value
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r:.80}")
            return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        return origin(_check(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    elif origin is dict or hint is dict:
        if isinstance(value, dict):
            return value
    elif hint not in (float, bool, int, str) and origin is None:
        return value  # a class of its own validates itself
    raise ConfigError(f"{where}: expected {_type_name(hint)}, got {value!r:.80}")


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    if typing.get_origin(hint) is dict or hint is dict:
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


def from_mapping(cls: type, values: Any, where: str) -> Any:
    """Dataclass ``cls`` from a mapping, checking keys and value types; every error names ``where.key``.

    ``ValueError`` / ``TypeError`` from the class's own checks come back as ``ConfigError`` prefixed with
    ``where`` (unless the message already names it).
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__} {values!r:.80}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (valid keys: {', '.join(sorted(names))})")
    checked = {k: _check(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**checked)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["train.max_steps=20", ...]`` -> ``[(["train", "max_steps"], 20), ...]``; values parsed as YAML."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.max_steps=20")
        parsed.append((key.split("."), yaml.safe_load(raw) if raw else None))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set each dotted key in the nested mapping ``raw`` (in place, creating sub-mappings); returns ``raw``."""
    for path, value in parse_overrides(overrides):
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i + 1])} is {child!r}, not a mapping")
            node = child
        node[path[-1]] = value
    return raw
