"""Encoder pretraining through the project's trainer (``training/pretrain.py``): the crop ROI of region_grades,
class-balanced heads, resume from a checkpoint and two processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reasonknee3d.config import ConfigError
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.families import load_experiment_config
from reasonknee3d.models.reasonknee3d.encoders import build_encoder
from reasonknee3d.models.reasonknee3d.region import crop_voxel_boxes
from reasonknee3d.models.reasonknee3d.region_heads import RegionGradeModel, grade_class_weights, grade_heads
from reasonknee3d.training.trainer import run_training

SHAPE = (16, 32, 32)
ENCODER = ('model.encoder={"patch_size": [4, 8, 8], "hidden_size": 16, "num_hidden_layers": 1, '
           '"num_attention_heads": 2, "intermediate_size": 32}')
STAGE = ["train.stage=region_grades", "train.encoder=full", "train.projector=frozen", "train.language_model=frozen",
         "train.new_token_rows=false", "train.dataloader_num_workers=0", "train.report_to=[]",
         "train.per_device_batch_size=2", "train.learning_rate=3e-3", "train.logging_steps=1",
         f"data.input_shape={list(SHAPE)}", "model.num_bins=32", "model.region_size=[8, 16, 16]", ENCODER]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pre") / "release"
    write_synthetic_release(root, n_volumes=4, shape=SHAPE, seed=3, questions=[1, 2, 30])
    return root


def _exp(release: Path, out: Path, *extra: str):
    return load_experiment_config("tiny_3d", [*STAGE, f"train.data_dir={json.dumps(str(release))}",
                                              f"train.output_dir={json.dumps(str(out))}", *extra])


def test_crop_of_a_box_the_crop_size_is_exactly_its_voxels() -> None:
    volumes = torch.randn(2, 1, 8, 12, 16)
    crops = crop_voxel_boxes(volumes[[1, 0]], [[2, 5, 0, 11, 4, 11], [0, 7, 3, 5, 0, 15]], (4, 12, 8))
    torch.testing.assert_close(crops[0, 0], volumes[1, 0, 2:6, :, 4:12])
    # A box smaller than the crop size is resampled, not padded: voxels 3..5 at 6 cell centres, the centre of
    # cell i at voxel coordinate 2.75 + 0.5 i (trilinear between the two voxels around it).
    small = crop_voxel_boxes(volumes[[0]], [[0, 7, 3, 5, 0, 15]], (8, 6, 16))
    v = volumes[0, 0]
    torch.testing.assert_close(small[0, 0, :, 1, :], 0.75 * v[:, 3, :] + 0.25 * v[:, 4, :])
    torch.testing.assert_close(small[0, 0, :, 4, :], 0.25 * v[:, 4, :] + 0.75 * v[:, 5, :])


def test_crop_roi_features_encode_each_box_on_its_own() -> None:
    exp = load_experiment_config("tiny_3d", [ENCODER, f"data.input_shape={list(SHAPE)}"])
    enc_config, _ = exp.model.sub_configs(exp.data.input_shape)
    torch.manual_seed(0)
    model = RegionGradeModel(build_encoder(enc_config), grade_heads(), roi="crop", crop_size=[8, 16, 16]).eval()
    volumes = torch.randn(2, 1, *SHAPE)
    boxes = [[0, 7, 0, 15, 0, 15], [4, 11, 8, 31, 0, 31]]
    with torch.no_grad():
        got = model.roi_features(volumes, [1, 0], boxes)
        first, _ = model.encoder(volumes[1:2, :, 0:8, 0:16, 0:16])
    assert got.shape == (2, 2 * 16)
    torch.testing.assert_close(got[0], torch.cat([first[0].mean(0), first[0].amax(0)]))
    # The second box is another crop: its feature differs from the first's.
    assert not torch.allclose(got[0], got[1])


def test_class_weights_make_every_grade_count_equally_at_power_one() -> None:
    heads = {"h": [0, 1, 2]}
    targets = [("h", 0)] * 6 + [("h", 1)] * 3 + [("h", 2)] * 1
    w = grade_class_weights(targets, heads, 1.0)["h"]
    counts = torch.tensor([6.0, 3.0, 1.0])
    totals = w * counts
    torch.testing.assert_close(totals, torch.full((3,), float(totals[0])))  # each grade's total weight is equal
    assert float((w * counts).sum() / counts.sum()) == pytest.approx(1.0)  # average 1 over the targets
    assert grade_class_weights(targets, heads, 0.0) == {}
    half = grade_class_weights(targets, heads, 0.5)["h"]
    assert float(half[2] / half[0]) == pytest.approx(6 ** 0.5)


def test_crop_mode_needs_a_crop_size(release: Path, tmp_path: Path) -> None:
    exp = _exp(release, tmp_path / "x", "model.region_size=null", "train.max_steps=1")
    with pytest.raises(ConfigError, match="crop needs train.pretrain.crop_size or model.region_size"):
        run_training(exp)
    with pytest.raises(ConfigError, match="train.grade_balance"):
        run_training(_exp(release, tmp_path / "y", "train.max_steps=1", "train.grade_balance=1"))


@pytest.mark.parametrize("roi", ["crop", "grid"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(release: Path, tmp_path: Path, roi: str) -> None:
    common = [f"train.pretrain.roi={roi}", "train.save_steps=2", "train.lr_scheduler=constant",
              "train.warmup_ratio=0", "train.seed=5", "train.pretrain.class_balance=1"]
    whole = run_training(_exp(release, tmp_path / "whole", *common, "train.max_steps=4"))
    assert whole.resumed_from is None and whole.global_step == 4
    first = run_training(_exp(release, tmp_path / "split", *common, "train.max_steps=2"))
    assert first.global_step == 2 and (tmp_path / "split" / "checkpoint-2" / "model.safetensors").is_file()
    second = run_training(_exp(release, tmp_path / "split", *common, "train.max_steps=4"))
    assert second.resumed_from is not None and Path(second.resumed_from).name == "checkpoint-2"
    assert second.global_step == 4
    a = load_file(str(tmp_path / "whole" / "encoder" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "encoder" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    heads = json.loads((tmp_path / "split" / "region_heads.json").read_text())
    assert heads["roi"] == roi and (heads["crop_size"] == [8, 16, 16] if roi == "crop" else heads["crop_size"] is None)


def test_two_processes_pretrain_one_encoder(release: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` (gloo) on the real CLI entry: every head gets a gradient on every step
    (DDP without find_unused_parameters would stop otherwise), and the main process writes the run once."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "reasonknee3d", "train", "--config", "tiny_3d", "--data", str(release), "--output-dir", str(out),
           "--max-steps", "2", "--save-steps", "1000", *STAGE, "train.per_device_batch_size=1"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "encoder" / "model.safetensors").is_file() and (out / "region_heads.safetensors").is_file()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
