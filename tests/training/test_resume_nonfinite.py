"""Resume from the newest complete checkpoint; stop at the first non-finite loss without saving it."""
from __future__ import annotations

from reasonknee3d.families import resolve_config

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from toy_family import ToyDataset, ToyFamily, collate, toy_experiment

from reasonknee3d.training.checkpoints import INCOMPLETE_DIR, checkpoint_problems, resolve_resume
from reasonknee3d.config import ConfigError, TrainConfig
from reasonknee3d.training.trainer import NonFiniteTrainingError, run_training


def _incomplete_copy(src: Path, dst: Path, keep: tuple[str, ...]) -> None:
    dst.mkdir()
    for name in keep:
        (dst / name).write_bytes((src / name).read_bytes())


@pytest.mark.parametrize("stage", ["instruction", "alignment"])
def test_checkpoint_files_define_complete(tmp_path: Path, stage: str) -> None:
    run_training(toy_experiment(tmp_path, stage=stage, max_steps=2), family=ToyFamily())
    assert checkpoint_problems(tmp_path / "checkpoint-2") == []
    assert checkpoint_problems(tmp_path / "final")  # a model folder, not a resumable checkpoint
    state = tmp_path / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text()[:20])  # killed while the Trainer wrote its last file
    assert checkpoint_problems(tmp_path / "checkpoint-2") == ["trainer_state.json is unreadable or cut short"]


def test_resume_skips_a_checkpoint_holding_only_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_training(toy_experiment(tmp_path, max_steps=2), family=ToyFamily())
    _incomplete_copy(tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", ("config.json",))
    with caplog.at_level(logging.WARNING, logger="reasonknee3d.training.checkpoints"):
        result = run_training(toy_experiment(tmp_path, max_steps=4), family=ToyFamily())
    assert result.resumed_from == str(tmp_path / "checkpoint-2") and result.global_step == 4
    message = next(r.getMessage() for r in caplog.records if "incomplete" in r.getMessage())
    assert str(tmp_path / "checkpoint-4") in message and "no trainer_state.json" in message
    assert "no optimizer state" in message and f"moved to {tmp_path / INCOMPLETE_DIR / 'checkpoint-4'}" in message
    # Moved aside, kept; the resumed run wrote a complete checkpoint-4 of its own.
    assert sorted(p.name for p in (tmp_path / INCOMPLETE_DIR).iterdir()) == ["checkpoint-4"]
    assert checkpoint_problems(tmp_path / "checkpoint-4") == []
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_resume_without_any_complete_checkpoint_starts_fresh(tmp_path: Path, caplog) -> None:
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "config.json").write_text("{}")
    (tmp_path / "checkpoint-3" / "optimizer.pt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="reasonknee3d.training.checkpoints"):
        assert resolve_resume("auto", tmp_path) is None
    assert "checkpoint-3" in caplog.text and (tmp_path / INCOMPLETE_DIR / "checkpoint-3").is_dir()
    # An explicit incomplete checkpoint is an error that names what it lacks.
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint .*no trainer_state.json"):
        resolve_resume(str(tmp_path / INCOMPLETE_DIR / "checkpoint-3"), tmp_path)


def test_resume_leaves_incomplete_checkpoints_to_rank_zero(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "checkpoint-3").mkdir()
    monkeypatch.setenv("RANK", "1")
    assert resolve_resume("auto", tmp_path) is None
    assert (tmp_path / "checkpoint-3").is_dir() and not (tmp_path / INCOMPLETE_DIR).exists()


@pytest.mark.parametrize("key, value", [
    ("learning_rate", math.inf), ("learning_rate", math.nan), ("learning_rate", 0.0),
    ("max_grad_norm", -1.0), ("max_grad_norm", math.inf), ("weight_decay", -5.0), ("weight_decay", math.nan),
    ("warmup_ratio", math.nan), ("num_epochs", math.inf), ("coord_label_sigma", math.inf),
])
def test_optimisation_numbers_must_be_finite_and_in_range(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"train\.{key}: expected a finite number .*got {value!r}"):
        TrainConfig(**{key: value})


def test_yaml_inf_override_is_rejected_with_the_dotted_key(tmp_path: Path) -> None:
    from reasonknee3d.families import load_experiment_config
    cfg = resolve_config("tiny_3d")
    with pytest.raises(ConfigError, match=r"tiny_3d.yaml: train\.learning_rate: expected a finite number > 0, "
                                          r"got inf"):
        load_experiment_config(cfg, ["train.learning_rate=.inf"])
    assert TrainConfig(max_grad_norm=0.0, weight_decay=0.0).max_grad_norm == 0.0  # 0 turns clipping off


class _NaNFamily(ToyFamily):
    """The toy family with one volume of NaNs (item ``bad``)."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    def train_data(self, exp, model, processor):
        data = ToyDataset(self.n_samples)
        data.items[self.bad]["volume"] = torch.full_like(data.items[self.bad]["volume"], float("nan"))
        return data, collate


@pytest.mark.parametrize("case", ["huge_lr", "nan_input"])
def test_non_finite_training_stops_without_saving(tmp_path: Path, case: str) -> None:
    if case == "huge_lr":
        exp, family = toy_experiment(tmp_path, stage="alignment", learning_rate=1e30, max_grad_norm=0.0), ToyFamily()
    else:
        # Batches of 24 items hold every item: step 1 already sees the NaN volume.
        exp, family = toy_experiment(tmp_path, per_device_batch_size=24), _NaNFamily(bad=5)
    with pytest.raises(NonFiniteTrainingError, match=r"training stopped at step \d+: loss .* is not finite") as err:
        run_training(exp, family=family)
    step = int(str(err.value).split("step ")[1].split(":")[0])
    assert not (tmp_path / "final").exists() and not (tmp_path / ".final.tmp").exists()
    # Every checkpoint written holds finite weights from before the failing step.
    for ckpt in tmp_path.glob("checkpoint-*"):
        assert int(ckpt.name.split("-")[1]) < step
        from safetensors.torch import load_file
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
        if (tmp_path / "metrics.jsonl").exists() else []
    assert all(math.isfinite(r["loss"]) for r in rows) and len(rows) == step - 1


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        """Sets one trainable weight to inf after step 1, before the step-2 checkpoint is written."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = math.inf

    with pytest.raises(NonFiniteTrainingError, match=r"step 2: trainable weights are not finite \(model\.encoder"):
        run_training(toy_experiment(tmp_path, stage="alignment"), family=ToyFamily(), callbacks=[Poison()])
    assert not (tmp_path / "checkpoint-2").exists() and not (tmp_path / "final").exists()


def test_run_files_follow_the_umask(tmp_path: Path) -> None:
    import os
    import stat
    old = os.umask(0o027)
    try:
        run_training(toy_experiment(tmp_path / "run", max_steps=2), family=ToyFamily())
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").rglob("*")}
    assert {"run/final/model.safetensors", "run/checkpoint-2/adapter_model.safetensors",
            "run/base_model/model.safetensors", "run/metrics.jsonl"} <= set(modes)
    assert {k: v for k, v in modes.items() if v != (0o750 if (tmp_path / k).is_dir() else 0o640)} == {}
