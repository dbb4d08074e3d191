"""``train.stage: segmentation``: encoder pretraining on the release's masks (a per-cell decoder, MONAI's DiceCELoss),
the mask cache it reads, and ``model.encoder.init_from`` loading the encoder it writes."""
from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from reasonknee3d.data.mask_cache import MaskCache
from reasonknee3d.data.release import ReleaseLoader
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.data.transforms import PreprocessConfig, build_preprocess
from reasonknee3d.families import get_family, load_experiment_config
from reasonknee3d.models.reasonknee3d.segmentation_head import (SegmentationModel, cell_size, label_dice,
                                                                load_segmentation_model)
from reasonknee3d.training.segmentation import SegmentationDataset
from reasonknee3d.training.trainer import run_training

SHAPE = (16, 32, 32)
ENCODER = ('model.encoder={"patch_size": [4, 8, 8], "hidden_size": 16, "num_hidden_layers": 1, '
           '"num_attention_heads": 2, "intermediate_size": 32}')
TINY_LM = 'model.language_model.tiny={"hidden_size": 32, "intermediate_size": 64, "bpe_vocab_size": 300}'


def _experiment(release, out, *extra: str):
    return load_experiment_config("tiny_3d", [
        ENCODER, TINY_LM, f"data.input_shape={list(SHAPE)}", "model.region_size=null", "train.stage=segmentation",
        "train.encoder=full", "train.projector=frozen", "train.language_model=frozen", "train.new_token_rows=false",
        f"train.data_dir={json.dumps(str(release))}", f"train.output_dir={json.dumps(str(out))}",
        "train.per_device_batch_size=2", "train.dataloader_num_workers=0", "train.learning_rate=3e-3",
        "train.lr_scheduler=constant", "train.warmup_ratio=0", *extra])


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    write_synthetic_release(root / "rel", n_volumes=4, shape=SHAPE, seed=0, questions=[1, 30])
    return root / "rel"


@pytest.fixture(scope="module")
def trained(release, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg_out") / "run"
    torch.manual_seed(0)
    return run_training(_experiment(release, out, "train.max_steps=24", "train.logging_steps=4")), out


# --- the decoder ------------------------------------------------------------------------------------------------

class _FixedEncoder(torch.nn.Module):
    """Returns given features on a given grid, whatever the volume: the decoder alone is under test."""

    def __init__(self, features: torch.Tensor, grid, input_size) -> None:
        super().__init__()
        self.features, self.grid = features, tuple(grid)
        self.config = SimpleNamespace(input_size=list(input_size), hidden_size=features.shape[-1],
                                      encoder_type="fixed", grid_for=lambda shape: self.grid)

    def forward(self, volumes):
        return self.features, self.grid


@settings(max_examples=20, deadline=None)
@given(grid=st.tuples(*[st.integers(1, 3)] * 3), cell=st.tuples(*[st.integers(1, 3)] * 3),
       num_labels=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_the_decoder_puts_each_cells_labels_on_that_cells_voxels(grid, cell, num_labels, seed) -> None:
    # A known label volume; feature n is the one-hot of cell n, and the decoder's Linear writes, for cell n, the
    # one-hot of each voxel's true label: the argmax must give back the volume, voxel for voxel.
    g = torch.Generator().manual_seed(seed)
    shape = tuple(a * b for a, b in zip(grid, cell))
    labels = torch.randint(0, num_labels, shape, generator=g)
    n_cells = grid[0] * grid[1] * grid[2]
    features = torch.eye(n_cells)[None].repeat(2, 1, 1)  # (B, N, C = N), grid order
    model = SegmentationModel(_FixedEncoder(features, grid, shape), num_labels)
    assert model.cell == cell
    weight = torch.zeros(num_labels, *cell, n_cells)  # output row (k, c0, c1, c2), input column n
    for n in range(n_cells):
        i0, rest = divmod(n, grid[1] * grid[2])
        i1, i2 = divmod(rest, grid[2])
        block = labels[i0 * cell[0]:(i0 + 1) * cell[0], i1 * cell[1]:(i1 + 1) * cell[1],
                       i2 * cell[2]:(i2 + 1) * cell[2]]
        weight[:, :, :, :, n] = torch.nn.functional.one_hot(block, num_labels).permute(3, 0, 1, 2).float()
    with torch.no_grad():
        model.head.weight.copy_(weight.reshape(-1, n_cells))
        model.head.bias.zero_()
        logits = model.logits(torch.zeros(2, 1, *shape))
    assert logits.shape == (2, num_labels, *shape)
    assert torch.equal(logits.argmax(1), labels[None].expand(2, *shape))


def test_a_voxels_logits_come_from_its_own_cells_feature() -> None:
    grid, cell, num_labels = (2, 3, 2), (2, 1, 3), 3
    shape = tuple(a * b for a, b in zip(grid, cell))
    features = torch.randn(1, 12, 5)
    model = SegmentationModel(_FixedEncoder(features, grid, shape), num_labels)
    with torch.no_grad():
        logits = model.logits(torch.zeros(1, 1, *shape))
        out = model.head(features[0]).view(12, num_labels, *cell)  # per cell: (K, c0, c1, c2)
    for v in [(0, 0, 0), (3, 2, 5), (1, 1, 4), (2, 0, 3)]:
        n = (v[0] // cell[0]) * grid[1] * grid[2] + (v[1] // cell[1]) * grid[2] + v[2] // cell[2]
        within = tuple(a % c for a, c in zip(v, cell))
        torch.testing.assert_close(logits[0, :, v[0], v[1], v[2]], out[n, :, within[0], within[1], within[2]])


def test_input_not_a_multiple_of_the_grid_is_an_error_naming_both() -> None:
    with pytest.raises(ValueError, match=r"input shape \[16, 30, 32\] .* grid \[4, 4, 4\]"):
        cell_size((16, 30, 32), (4, 4, 4))
    assert cell_size((16, 32, 32), (4, 4, 4)) == (4, 8, 8)


def test_log_metrics_is_the_foreground_dice_of_the_argmax() -> None:
    # Logits that predict the mask exactly in one half of the volume and background in the other.
    grid, shape = (1, 1, 1), (2, 2, 4)
    model = SegmentationModel(_FixedEncoder(torch.ones(1, 1, 1), grid, shape), 3)
    mask = torch.tensor([[[1, 1, 2, 2], [0, 0, 2, 2]], [[1, 1, 0, 0], [0, 0, 0, 0]]])
    pred = mask.clone()
    pred[:, :, 2:] = 0  # label 2 is missed entirely, label 1 found exactly
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.nn.functional.one_hot(pred, 3).permute(3, 0, 1, 2).reshape(-1) * 5.0)
    out = model(torch.zeros(1, 1, *shape), mask[None, None].to(torch.uint8))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert model.log_metrics() == {"dice": pytest.approx(0.5)}  # mean of Dice 1 (label 1) and 0 (label 2)
    assert model.log_metrics() == {}  # nothing since the last call
    with pytest.raises(ValueError, match="masks hold label 3; the model has num_labels 3"):
        model(torch.zeros(1, 1, *shape), torch.full((1, 1, *shape), 3, dtype=torch.uint8))


@settings(max_examples=15, deadline=None)
@given(num_labels=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_label_dice_equals_monais_dice_metric(num_labels, seed) -> None:
    from monai.metrics import DiceMetric

    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_labels, (3, 1, 3, 4, 5), generator=g)
    target[0][target[0] == num_labels - 1] = 0  # a label absent from one mask: NaN there, left out of means
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target,
                       torch.randint(0, num_labels, target.shape, generator=g))
    ours = label_dice(pred[:, 0], target[:, 0], num_labels)
    monai = DiceMetric(include_background=False, reduction="none", ignore_empty=True,
                       num_classes=num_labels)(y_pred=pred, y=target)
    torch.testing.assert_close(ours, monai.double(), equal_nan=True)
    assert torch.isnan(ours[0, -1])


# --- the mask cache -------------------------------------------------------------------------------------------

def test_cached_mask_is_the_nearest_resize_of_the_stored_mask_mirrored_like_its_volume(release, tmp_path) -> None:
    cfg = PreprocessConfig(input_shape=(12, 20, 24), canonical_side="right")
    cache = MaskCache(tmp_path / "masks", cfg)
    loader = ReleaseLoader(release)
    records = [r for split in ("train", "test") for r in loader.volumes(split)]
    assert {r.knee_side for r in records} == {"left", "right"}
    for rec in records:
        meta = cache.put(rec.image_path, rec.mask_path)
        cached, _ = cache.read_tensor(rec.image_path, rec.mask_path)
        expected = build_preprocess(cfg, with_mask=True)({"image": rec.image_path, "mask": rec.mask_path})["mask"]
        expected = np.asarray(expected)[0]
        mirrored = rec.knee_side == "left"
        assert meta["mirrored"] is mirrored and cached.dtype == torch.uint8 and cached.shape == (1, 12, 20, 24)
        np.testing.assert_array_equal(cached[0].numpy(), expected[::-1] if mirrored else expected)
        assert meta["labels"] == sorted(np.unique(expected).tolist()) and meta["max_label"] > 0
    # The key follows the settings that change the array, and the mask file's identity.
    rec = records[0]
    other = MaskCache(tmp_path / "masks", PreprocessConfig(input_shape=(12, 20, 24), canonical_side="left"))
    assert other.key(rec.image_path, rec.mask_path) != cache.key(rec.image_path, rec.mask_path)
    intensity = MaskCache(tmp_path / "masks", PreprocessConfig(input_shape=(12, 20, 24), canonical_side="right",
                                                               normalization="minmax"))
    assert intensity.key(rec.image_path, rec.mask_path) == cache.key(rec.image_path, rec.mask_path)
    before = cache.key(rec.image_path, rec.mask_path)
    copy = tmp_path / "mask_copy.nii.gz"
    shutil.copy(rec.mask_path, copy)
    assert cache.key(rec.image_path, copy) != before


# --- the stage -------------------------------------------------------------------------------------------------

def test_segmentation_trains_the_encoder_and_writes_encoder_and_head(trained) -> None:
    result, out = trained
    assert result.global_step == 24 and result.final_dir == out / "encoder"
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [4, 8, 12, 16, 20, 24]
    assert all(np.isfinite(r["loss"]) and 0 <= r["dice"] <= 1 for r in logs)
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]  # it learns the one training volume's mask
    head = json.loads((out / "segmentation_head.json").read_text())
    assert head["num_labels"] == 65 and head["cell_size"] == [4, 8, 8] and head["hidden_size"] == 16
    assert head["label_count_seen"] == len(head["labels_seen"]) > 1
    weights = load_file(str(out / "segmentation_head.safetensors"))
    assert weights["weight"].shape == (65 * 4 * 8 * 8, 16)
    # The folder loads back as the trained model: same decoder, same encoder weights.
    loaded = load_segmentation_model(out)
    torch.testing.assert_close(loaded.head.weight, result.model.head.weight.detach().cpu())
    for key, value in result.model.encoder.state_dict().items():
        torch.testing.assert_close(loaded.encoder.state_dict()[key], value.cpu())
    assert not (out / "skipped.jsonl").exists()  # every training volume has its mask
    with pytest.raises(FileNotFoundError, match="not a segmentation output folder"):
        load_segmentation_model(out / "encoder")


def test_init_from_loads_the_segmentation_encoder_into_a_fresh_3d_model(trained) -> None:
    result, _ = trained
    saved = load_file(str(result.final_dir / "model.safetensors"))
    exp = load_experiment_config("tiny_3d", [ENCODER[:-1] + f', "init_from": {json.dumps(str(result.final_dir))}}}',
                                             TINY_LM, f"data.input_shape={list(SHAPE)}", "model.region_size=null"])
    model, _ = get_family("3d").build(exp, "sdpa")
    own = model.model.encoder.state_dict()
    assert set(own) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(own[key], value)


def test_resume_from_checkpoint(release, tmp_path) -> None:
    first = run_training(_experiment(release, tmp_path / "run", "train.max_steps=2", "train.save_steps=2",
                                     "train.logging_steps=1"))
    assert first.global_step == 2 and (tmp_path / "run" / "checkpoint-2").is_dir()
    again = run_training(_experiment(release, tmp_path / "run", "train.max_steps=4", "train.save_steps=2",
                                     "train.logging_steps=1"))
    assert again.resumed_from == str(tmp_path / "run" / "checkpoint-2") and again.global_step == 4
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]


def test_volumes_without_a_mask_are_skipped_and_listed(release, tmp_path, caplog) -> None:
    rel = tmp_path / "rel"
    shutil.copytree(release, rel)
    records = ReleaseLoader(rel).volumes("val")  # two volumes: drop one mask, train on the other
    assert len(records) == 2
    records[0].mask_path.unlink()
    with caplog.at_level(logging.INFO, logger="reasonknee3d.training"):
        result = run_training(_experiment(rel, tmp_path / "run", "train.split=val", "train.max_steps=2"))
    assert result.global_step == 2
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [s["item"] for s in skipped] == [records[0].volume_id]
    assert str(records[0].mask_path) in skipped[0]["reason"] and "file not found" in skipped[0]["reason"]
    assert "1 of 2 volumes of split val have a usable mask; 1 left out" in caplog.text
    # No mask left at all: an error naming the split and the count.
    records[1].mask_path.unlink()
    with pytest.raises(ValueError, match=r"split 'val' has no volume with a usable mask: 2 of 2 volumes"):
        SegmentationDataset(rel, "val", PreprocessConfig(input_shape=SHAPE))


def test_a_mask_label_beyond_num_labels_is_an_error_naming_the_file(release, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"knee_000\.nii\.gz: mask label 64 >= num_labels 10"):
        run_training(_experiment(release, tmp_path / "run", "train.max_steps=1", "train.pretrain.num_labels=10"))
