"""Trainer wiring on the toy family: logs, loadable checkpoints, merge, and resume after a kill."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from toy_family import ToyDataset, ToyFamily, ToyModel, collate, toy_experiment
from transformers import TrainerCallback

from reasonknee3d.training.checkpoints import has_adapter, merge_checkpoint
from reasonknee3d.training.plots import plot_loss_curves, read_scalars
from reasonknee3d.training.trainer import run_training


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**collate([ToyDataset()[i] for i in range(4)])).logits


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("lora_run")
    result = run_training(toy_experiment(out, report_to=["tensorboard"], merge=True), family=ToyFamily())
    return out, result


def test_run_writes_metrics_tensorboard_and_resolved_config(lora_run) -> None:
    out, result = lora_run
    assert result.global_step == 6 and result.resumed_from is None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert set(row) >= {"step", "loss", "learning_rate", "samples_per_second", "data_wait_fraction"}
        assert row["samples_per_second"] > 0 and 0 <= row["data_wait_fraction"] <= 1
    assert [s for s, _ in read_scalars(out, "train/loss")] == list(range(1, 7))
    png = plot_loss_curves({"toy": out}, out / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["train"]["language_model"] == "lora" and resolved["train"]["encoder"] == "frozen"
    assert (out / "final" / "experiment.yaml").is_file()


def test_every_checkpoint_loads_with_from_pretrained(lora_run) -> None:
    out, result = lora_run
    trained = _logits(result.model)
    final = ToyModel.from_pretrained(out / "final")
    assert torch.allclose(_logits(final), trained, atol=1e-5)
    for ckpt in ("checkpoint-4", "checkpoint-6"):
        assert has_adapter(out / ckpt) and (out / ckpt / "model.safetensors").is_file()
    assert torch.allclose(_logits(ToyModel.from_pretrained(out / "checkpoint-6")), trained, atol=1e-5)
    # checkpoint-4 is an earlier state: it loads, and differs from the end of training.
    assert not torch.allclose(_logits(ToyModel.from_pretrained(out / "checkpoint-4")), trained, atol=1e-5)


def test_merged_model_has_no_adapter_and_same_outputs(lora_run) -> None:
    out, result = lora_run
    merged = out / "merged"
    assert result.merged_dir == merged and not has_adapter(merged)
    assert torch.allclose(_logits(ToyModel.from_pretrained(merged)), _logits(result.model), atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        merge_checkpoint(merged, out / "merged2", ToyModel)


def test_alignment_checkpoint_is_a_plain_model(tmp_path: Path) -> None:
    result = run_training(toy_experiment(tmp_path, stage="alignment", max_steps=2), family=ToyFamily())
    assert not has_adapter(tmp_path / "final")
    assert torch.allclose(_logits(ToyModel.from_pretrained(tmp_path / "final")), _logits(result.model), atol=1e-6)


class _Kill(TrainerCallback):
    """Simulates a crash after ``step`` (past the checkpoint at step 4)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("killed")


@pytest.mark.parametrize("stage", ["instruction", "alignment"])
def test_resume_after_kill_reaches_the_same_losses(tmp_path: Path, stage: str) -> None:
    # Deterministic on CPU (fixed seeds, no dropout, data order restored by Trainer): losses agree to
    # float32 round-off, stated as rtol 1e-5.
    full = run_training(toy_experiment(tmp_path / "full", stage=stage), family=ToyFamily())
    with pytest.raises(KeyboardInterrupt):
        run_training(toy_experiment(tmp_path / "killed", stage=stage), family=ToyFamily(), callbacks=[_Kill(5)])
    resumed = run_training(toy_experiment(tmp_path / "killed", stage=stage), family=ToyFamily())
    assert resumed.resumed_from.endswith("checkpoint-4") and resumed.global_step == 6
    assert _losses(tmp_path / "killed") == pytest.approx(_losses(tmp_path / "full"), rel=1e-5)
    assert torch.allclose(_logits(resumed.model), _logits(full.model), atol=1e-5)


def test_coord_label_sigma_trains_with_the_smoothed_loss(tmp_path: Path) -> None:
    # Same seed and data: the first logged loss is the plain CE at sigma 0 and the smoothed loss at sigma 1,
    # each equal to the loss recomputed on the first batch with the untrained model.
    from types import SimpleNamespace

    from toy_family import NEW_TOKENS, ToyConfig

    from reasonknee3d.training.losses import CoordinateSmoothedLoss

    first = {}
    for sigma in (0.0, 1.0):
        out = tmp_path / f"s{sigma}"
        run_training(toy_experiment(out, max_steps=1, save_steps=100, coord_label_sigma=sigma,
                                    per_device_batch_size=24), family=ToyFamily())
        first[sigma] = _losses(out)[0]
    torch.manual_seed(42)  # TrainConfig's default seed: the same initial weights as the runs
    model = ToyModel(ToyConfig())
    batch = collate([ToyDataset()[i] for i in range(24)])
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    for sigma, logged in first.items():
        expect = CoordinateSmoothedLoss(NEW_TOKENS, sigma)(SimpleNamespace(logits=logits), batch["labels"])
        assert logged == pytest.approx(expect.item(), rel=1e-5, abs=0)
    assert abs(first[1.0] - first[0.0]) > 1e-4  # near-uniform coordinate logits at init: a small gap
