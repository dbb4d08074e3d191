"""Experiment config schema: every configs/*.yaml validates; bad keys, values and combinations are named."""
from __future__ import annotations

from pathlib import Path

import pytest
from toy_family import ToyFamily

from reasonknee3d.config import ConfigError, TrainConfig, apply_overrides
from reasonknee3d.families import load_experiment_config, preset_names, registry, save_experiment_config

# Launcher configs of scripts/train_accelerate.sh (not experiments; they stay in the repository).
ACCELERATE_CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("accelerate_*.yaml"))


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates(name: str) -> None:
    cfg = load_experiment_config(name)
    assert cfg.family in ("3d", "slice")
    assert cfg.train.language_model in ("frozen", "lora", "full")


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_accelerate_configs_load(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    cfg = load_config_from_file(str(path))
    assert cfg.num_processes >= 1 and cfg.mixed_precision in ("no", "bf16", "fp16")


@pytest.fixture
def toy_families(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validate the ``model:`` section with the toy family so these tests do not depend on the real ones."""
    monkeypatch.setattr(registry, "_FAMILIES", {"3d": ToyFamily, "slice": ToyFamily})


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


BASE = """\
family: 3d
data:
  input_shape: [8, 16, 16]
model: {}
train:
  stage: alignment
  learning_rate: 1e-3
"""


def test_stage_defaults_overrides_and_resolved_round_trip(tmp_path: Path, toy_families: None) -> None:
    path = _write(tmp_path, BASE)
    cfg = load_experiment_config(path, ["train.max_steps=20", "train.lora.r=4", "data.normalization=minmax"])
    assert cfg.train.modes() == {"encoder": "full", "projector": "full", "language_model": "frozen"}
    assert cfg.train.learning_rate == 1e-3  # YAML reads 1e-3 as a string; the schema makes it a float
    assert cfg.train.max_steps == 20 and cfg.train.lora.r == 4 and cfg.data.normalization == "minmax"
    assert cfg.data.input_shape == (8, 16, 16)
    save_experiment_config(cfg, tmp_path / "resolved.yaml")
    again = load_experiment_config(tmp_path / "resolved.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "train.max_stepz: unknown key"),
    ("train.lora.rank=3", "train.lora.rank: unknown key"),
    ("train.max_steps=many", "train.max_steps: expected int"),
    ("train.stage=pretrain", "train.stage: expected one of"),
    ("train.language_model=lora", "alignment stage keeps the language model frozen"),
    ("train.encoder=lora", "train.encoder: LoRA is applied to the language model only"),
    ("train.merge=true", "train.merge: true needs train.language_model: lora"),
    ("train.new_token_rows=true", "train.new_token_rows: true needs train.language_model: lora"),
    ("data.input_shape=[8, 16]", "data.input_shape: expected 3 values"),
    ("data.spacing=1", "data.spacing: unknown key"),
    ("model.hiden=3", "model.hiden: unknown key"),
    ("family=2d", "family: unknown model family '2d'"),
    ("trian.max_steps=3", "trian: unknown top-level key"),
    ("train.max_steps", "expected dotted.key=value"),
])
def test_errors_name_the_file_and_key(tmp_path: Path, toy_families: None, override: str, message: str) -> None:
    path = _write(tmp_path, BASE)
    with pytest.raises(ConfigError, match=str(path)) as err:
        load_experiment_config(path, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("train, message", [
    (dict(stage="instruction", language_model="frozen", projector="frozen", new_token_rows=False),
     "nothing would train"),
    (dict(stage="instruction", lora={"targets": []}), "at least one target"),
    (dict(max_steps=-1, num_epochs=0), "train.max_steps / train.num_epochs"),
    (dict(save_steps=0), "train.save_steps: expected an integer >= 1"),
    (dict(warmup_ratio=1.5), "train.warmup_ratio"),
    (dict(bf16="maybe"), "train.bf16"),
])
def test_contradictory_train_settings(train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**train)


def test_override_into_a_scalar_is_rejected() -> None:
    with pytest.raises(ConfigError, match="train.lora is 3, not a mapping"):
        apply_overrides({"train": {"lora": 3}}, ["train.lora.r=4"])


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: no such config file and no preset of that name"):
        load_experiment_config(tmp_path / "nope.yaml")
