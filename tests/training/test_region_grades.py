"""``train.stage: region_grades``: encoder pretraining on the grades inside each reference box, and
``model.encoder.init_from`` loading what it writes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from reasonknee3d.config import ConfigError
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.families import get_family, load_experiment_config
from reasonknee3d.schema import load_schema
from reasonknee3d.models.reasonknee3d.region_heads import box_cells, grade_heads, head_key, roi_pool
from reasonknee3d.training.trainer import run_training

TINY_LM = 'model.language_model.tiny={"hidden_size": 32, "intermediate_size": 64, "bpe_vocab_size": 300}'
SWIN = ('model.encoder={"encoder_type": "swin3d", "patch_size": [2, 4, 4], "depths": [1, 1], "num_heads": [1, 2], '
        '"window_size": [4, 4, 4], "hidden_size": 32}')


def test_box_cells_cover_the_cells_a_box_overlaps() -> None:
    # Volume 32 x 64 x 64 on a 4 x 4 x 4 grid: cells of 8 x 16 x 16 voxels.
    assert box_cells([0, 7, 16, 31, 40, 63], (32, 64, 64), (4, 4, 4)) == [slice(0, 1), slice(1, 2), slice(2, 4)]
    assert box_cells([8, 8, 0, 0, 63, 63], (32, 64, 64), (4, 4, 4)) == [slice(1, 2), slice(0, 1), slice(3, 4)]


def test_roi_pool_is_the_mean_over_the_box_cells() -> None:
    features = torch.randn(2, 2 * 3 * 4, 5)
    pooled = roi_pool(features, (2, 3, 4), (4, 6, 8), [1, 0], [[0, 1, 2, 5, 4, 7], [2, 3, 0, 1, 0, 1]])
    cube = features.view(2, 2, 3, 4, 5)
    torch.testing.assert_close(pooled[0], cube[1, 0, 1:3, 2:4].mean((0, 1)))
    torch.testing.assert_close(pooled[1], cube[0, 1, 0, 0])


def test_every_question_field_has_a_head_with_its_grades() -> None:
    heads = grade_heads()
    for spec in load_schema().values():
        for f in spec.fields:
            assert set(f.grades) <= set(heads[head_key(spec.category, f.key)])


def test_stage_defaults_and_contradictions() -> None:
    exp = load_experiment_config("tiny_3d", ["train.stage=region_grades", "train.encoder=null",
                                             "train.projector=null", "train.language_model=null",
                                             "train.new_token_rows=null"])
    assert exp.train.modes() == {"encoder": "full", "projector": "frozen", "language_model": "frozen"}
    with pytest.raises(ConfigError, match="region_grades stage trains the encoder alone"):
        load_experiment_config("tiny_3d", ["train.stage=region_grades"])  # tiny_3d trains the LM in full


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("rg")
    write_synthetic_release(root / "rel", n_volumes=4, shape=(32, 64, 64), seed=0, questions=[1, 2, 30, 44])
    exp = load_experiment_config("tiny_3d", [
        SWIN, TINY_LM, "train.stage=region_grades", "train.encoder=full", "train.projector=frozen",
        "train.language_model=frozen", "train.new_token_rows=false", f"train.data_dir={json.dumps(str(root / 'rel'))}",
        f"train.output_dir={json.dumps(str(root / 'out'))}", "train.max_steps=25", "train.logging_steps=5",
        "train.per_device_batch_size=2", "train.dataloader_num_workers=0", "train.learning_rate=3e-3",
        "train.lr_scheduler=constant", "train.warmup_ratio=0"])
    torch.manual_seed(0)
    return run_training(exp), root


def test_region_grades_trains_the_encoder_and_writes_an_encoder_folder(pretrained) -> None:
    result, root = pretrained
    out = root / "out"
    assert result.global_step == 25 and result.final_dir == out / "encoder"
    assert json.loads((out / "encoder" / "config.json").read_text())["encoder_type"] == "swin3d"
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [5, 10, 15, 20, 25]
    assert all(0 <= r["grade_accuracy"] <= 1 and torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    # It learns: on a few volumes, the training loss falls.
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"]
    heads = load_file(str(out / "region_heads.safetensors"))
    grades = json.loads((out / "region_heads.json").read_text())["grades"]
    assert set(grades) == set(grade_heads()) and all(f"{k}.weight" in heads for k in grades)
    # Questions without a box are listed with their reason, never silently dropped.
    from reasonknee3d.data.release import iter_samples
    boxless = sorted(s.sample_id for s in iter_samples(root / "rel", "train") if s.box is None)
    skipped = (out / "skipped.jsonl").read_text().splitlines() if boxless else []
    assert sorted(json.loads(line)["item"] for line in skipped) == boxless
    assert all(json.loads(line)["reason"] == "no reference box" for line in skipped)


def test_init_from_loads_the_pretrained_encoder_into_a_fresh_3d_model(pretrained) -> None:
    result, root = pretrained
    saved = load_file(str(result.final_dir / "model.safetensors"))
    exp = load_experiment_config("tiny_3d", [SWIN[:-1] + f', "init_from": {json.dumps(str(result.final_dir))}}}',
                                             TINY_LM])
    model, _ = get_family("3d").build(exp, "sdpa")
    own = model.model.encoder.state_dict()
    assert set(own) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(own[key], value)
    # Without init_from the same build starts elsewhere.
    plain, _ = get_family("3d").build(load_experiment_config("tiny_3d", [SWIN, TINY_LM]), "sdpa")
    assert any(not torch.equal(plain.model.encoder.state_dict()[k], v) for k, v in saved.items())


def test_init_from_errors_name_the_folder_and_tensor(pretrained, tmp_path) -> None:
    result, _ = pretrained
    folder = json.dumps(str(result.final_dir))
    wrong_type = load_experiment_config("tiny_3d", [f'model.encoder={{"init_from": {folder}}}', TINY_LM])
    with pytest.raises(ValueError, match="holds a 'swin3d' encoder"):
        get_family("3d").build(wrong_type, "sdpa")
    wider = SWIN.replace('"hidden_size": 32', '"hidden_size": 64')[:-1] + f', "init_from": {folder}}}'
    with pytest.raises(ValueError, match="has shape"):
        get_family("3d").build(load_experiment_config("tiny_3d", [wider, TINY_LM]), "sdpa")
    with pytest.raises(FileNotFoundError, match="not an encoder folder"):
        get_family("3d").build(load_experiment_config(
            "tiny_3d", [SWIN[:-1] + f', "init_from": {json.dumps(str(tmp_path))}}}', TINY_LM]), "sdpa")
