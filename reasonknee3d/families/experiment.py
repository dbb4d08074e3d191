"""The one experiment loader: a YAML file (or a preset's name) -> an ``ExperimentConfig`` of typed sections.

An experiment has four sections: ``family`` (a registered family's name), ``data``, ``model`` and ``train``.
``data`` and ``model`` are the family's own dataclasses (``Family.data_config_class`` /
``model_config_class``), ``train`` is ``config.TrainConfig``; all three are built by ``config.from_mapping``.
``key=value`` overrides (``train.max_steps=20``, ``model.projector.projector_type=pool3d_mlp``) are applied
to the parsed YAML before validation, so a bad override fails exactly like a bad file. Every error names the
file and the dotted key.

Presets ship inside the package (``reasonknee3d/configs/*.yaml``): ``--config tiny_3d`` finds one by name,
so ``demo``, ``bench`` and ``init`` work from an installed wheel; any other value is a path to a file.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from ..config import ConfigError, TrainConfig, apply_overrides, from_mapping, plain
from ..io_utils import write_text
from .registry import get_family



@dataclass
class ExperimentConfig:
    """One experiment: model family, preprocessing, model construction and training."""

    family: str
    """A registered family's name (``reasonknee3d.families.family_names()``)."""
    data: Any
    """Preprocessing: the family's ``data_config_class``."""
    model: Any
    """Model construction: the family's ``model_config_class``."""
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
        return {"family": self.family, "data": plain(dataclasses.asdict(self.data)),
                "model": plain(dataclasses.asdict(self.model)), "train": plain(dataclasses.asdict(self.train))}


def _preset_dir() -> Any:
    return resources.files("reasonknee3d").joinpath("configs")


def preset_names() -> list[str]:
    """Names of the experiment presets that ship with the package."""
    return sorted(p.name[:-len(".yaml")] for p in _preset_dir().iterdir()
                  if p.name.endswith(".yaml"))


def resolve_config(name_or_path: str | os.PathLike) -> Path:
    """A preset's file (``tiny_3d`` or ``tiny_3d.yaml``) or, for anything else, the path as given."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if path.is_file():
        return path
    stem = text[:-len(".yaml")] if text.endswith(".yaml") else text
    if os.sep not in text and stem in preset_names():
        with resources.as_file(_preset_dir() / f"{stem}.yaml") as found:
            return Path(found)
    raise ConfigError(f"{text}: no such config file and no preset of that name (presets: {', '.join(preset_names())})")


def experiment_from_dict(raw: Any, source: Optional[str] = None) -> ExperimentConfig:
    """Validate a parsed YAML mapping; errors are prefixed with ``source``."""
    where = f"{source}: " if source else ""
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping with family, data, model, train; got {type(raw).__name__}")
        unknown = sorted(set(raw) - {"family", "data", "model", "train"})
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown top-level key (valid: family, data, model, train)")
        family = get_family(raw.get("family"))
        exp = ExperimentConfig(family=raw["family"], data=from_mapping(family.data_config_class, raw.get("data"), "data"),
                               model=from_mapping(family.model_config_class, raw.get("model"), "model"),
                               train=from_mapping(TrainConfig, raw.get("train"), "train"), source=source)
        family.check(exp)
        return exp
    except ConfigError as err:
        raise ConfigError(f"{where}{err}") from None


def load_experiment_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file (or preset), apply ``key=value`` overrides, validate every section."""
    path = resolve_config(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file ({err.strerror or err})") from None
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
