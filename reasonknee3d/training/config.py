"""Experiment configuration: one YAML file per experiment, mirrored by the dataclasses below.

A YAML file has four sections (``family``, ``data``, ``model``, ``train``). ``train`` is a
:class:`TrainConfig`; ``data`` is validated by the data layer's ``PreprocessConfig``; ``model`` by the
family's own config class (see :mod:`reasonknee3d.training.families`). ``key=value`` overrides
(``train.max_steps=20``, ``model.projector.projector_type=mlp2x_gelu``) are applied before validation, so a bad
override fails exactly like a bad file. Every error names the file and the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..attention import ATTN_IMPLEMENTATIONS
from ..io_utils import write_text

STAGES = ("alignment", "instruction")
MODULE_ROLES = ("encoder", "projector", "language_model")
MODES = ("frozen", "lora", "full")

# What each stage trains when the config leaves a module's mode unset (None).
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "alignment": {"encoder": "full", "projector": "full", "language_model": "frozen", "new_token_rows": False},
    "instruction": {"encoder": "frozen", "projector": "full", "language_model": "lora", "new_token_rows": True},
}


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
class TrainConfig:
    """How to train: stage and per-module modes, optimisation, logging, checkpoints, runtime."""

    stage: str = "instruction"
    """alignment (encoder + projector train, language model frozen) | instruction (LoRA on the LM,
    projector and new token rows train)."""
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
    coord_label_sigma: float = 0.0
    """Gaussian width, in bins, of the coordinate-token targets (``training.losses``): near-miss bins share the
    target mass, so the ordinal box coordinates learn from fewer samples. 0 = plain cross-entropy."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = _build(LoraSettings, self.lora, "train.lora")
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


@dataclass
class ExperimentConfig:
    """One experiment: model family, preprocessing, model construction and training."""

    family: str
    """3d (volume encoder + projector + Qwen LM) | slice (stock Qwen2.5-VL over slices)."""
    data: Any
    """Preprocessing (the data layer's PreprocessConfig, or its mapping before validation)."""
    model: dict[str, Any]
    """Family-specific model settings, validated by the family's config class."""
    train: TrainConfig
    """Training settings."""
    source: Optional[str] = None
    """File the config was read from (for messages and the default output folder)."""

    def output_dir(self) -> Path:
        """``train.output_dir``, or runs/<config file stem>."""
        if self.train.output_dir:
            return Path(self.train.output_dir)
        return Path("runs") / (Path(self.source).stem if self.source else "experiment")

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping in the YAML layout (what ``save_experiment_config`` writes)."""
        data = dataclasses.asdict(self.data) if dataclasses.is_dataclass(self.data) else dict(self.data or {})
        return {"family": self.family, "data": _plain(data), "model": _plain(self.model),
                "train": _plain(dataclasses.asdict(self.train))}


def _plain(obj: Any) -> Any:
    """Tuples -> lists and paths -> strings so yaml.safe_dump writes plain YAML."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def _coerce(value: Any, annotation: str, where: str) -> Any:
    """Check ``value`` against a field annotation (as written in this module) and normalise numbers.

    YAML reads ``2e-4`` (no dot) as a string, so float fields also accept numeric strings.
    """
    optional = annotation.startswith("Optional[")
    kind = annotation[len("Optional["):-1] if optional else annotation
    if value is None and optional:
        return None
    if kind == "float" and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind == "bool" and isinstance(value, bool):
        return value
    elif kind == "str" and isinstance(value, str):
        return value
    elif kind == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    elif kind not in ("float", "int", "bool", "str", "list[str]"):
        return value  # nested dataclasses and Any validate themselves
    raise ConfigError(f"{where}: expected {kind}{' or null' if optional else ''}, got {value!r:.80}")


def _build(cls: type, values: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, checking keys and value types; errors name ``where.key``."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__} {values!r:.80}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (valid keys: {', '.join(sorted(fields))})")
    return cls(**{k: _coerce(v, str(fields[k].type), f"{where}.{k}") for k, v in values.items()})


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


def experiment_from_dict(raw: dict[str, Any], source: Optional[str] = None) -> ExperimentConfig:
    """Validate a parsed YAML mapping; errors are prefixed with ``source``."""
    where = f"{source}: " if source else ""
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping with family, data, model, train; got {type(raw).__name__}")
        unknown = sorted(set(raw) - {"family", "data", "model", "train"})
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown top-level key (valid: family, data, model, train)")
        family = raw.get("family")
        model = raw.get("model") or {}
        if not isinstance(model, dict):
            raise ConfigError(f"model: expected a mapping, got {model!r:.80}")
        train = _build(TrainConfig, raw.get("train") or {}, "train")
        # Imported here: families.py imports this module.
        from .families import get_family
        fam = get_family(family)
        data = fam.validate_data_config(raw.get("data") or {})
        fam.validate_model_config(model, data, train)
        return ExperimentConfig(family=family, data=data, model=model, train=train, source=source)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


def load_experiment_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``key=value`` overrides, validate every section."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    raw = raw if raw is not None else {}
    if isinstance(raw, dict):
        try:
            apply_overrides(raw, overrides)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    return experiment_from_dict(raw, source=str(path))


def save_experiment_config(cfg: ExperimentConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (stage defaults filled in) as YAML, atomically."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
