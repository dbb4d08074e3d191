"""Master weights in float32 under a bfloat16 model (models/precision.py) through the real trainer, both families."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.families import get_family, load_experiment_config
from reasonknee3d.training.stages import setup_trainable
from reasonknee3d.training.trainer import run_training

# The real configs' dtype settings (rk3d_qwen2.5vl_3b.yaml / slice_qwen2.5vl_3b.yaml) on the tiny presets.
REAL_DTYPE = ["model.dtype=bfloat16", "train.language_model=lora", "train.new_token_rows=true", "train.bf16=auto",
              "train.report_to=[]", "train.dataloader_num_workers=0", "train.logging_steps=1"]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release")
    write_synthetic_release(root, n_volumes=2, shape=(16, 32, 32), seed=0, questions=[1, 30])
    return root


def _adapter_dtypes(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters()}


def test_3d_trains_fp32_master_weights_and_reloads_them(tmp_path: Path, release: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = load_experiment_config("tiny_3d", [*REAL_DTYPE, f"train.data_dir={release}",
                                             f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1",
                                             "train.per_device_batch_size=2", "train.learning_rate=1e-5",
                                             "train.lr_scheduler=constant", "train.warmup_ratio=0",
                                             "train.save_steps=100", "model.language_model.tiny.num_hidden_layers=1"])
    result = run_training(exp)
    trained = result.model
    trainable = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values()), \
        sorted({str(p.dtype) for p in trainable.values()})
    frozen_lm = [p for n, p in trained.named_parameters() if "language_model.layers" in n and not p.requires_grad]
    assert frozen_lm and all(p.dtype == torch.bfloat16 for p in frozen_lm)

    # One AdamW step at lr 1e-5 moved the encoder; most of the moves are below bfloat16's spacing, so a bfloat16
    # parameter would have kept its value.
    base = load_file(str(tmp_path / "run" / "base_model" / "model.safetensors"))
    saved = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    key = "model.encoder.patch_embed.proj.weight"
    before, after = base[key], saved[f"base_model.model.{key}"]
    assert before.dtype == after.dtype == torch.float32
    moved = (after - before).abs()
    assert moved.max() > 0 and moved.max() < 1e-4
    assert (after.bfloat16() == before.bfloat16()).float().mean() > 0.5
    assert all(v.dtype == torch.float32 for v in saved.values())

    reloaded, _ = get_family("3d").load(tmp_path / "run" / "final", "sdpa")
    got = _adapter_dtypes(reloaded)
    want = {n.removeprefix("base_model.model."): p.dtype for n, p in trained.named_parameters()}
    assert got == want
    torch.testing.assert_close(reloaded.get_parameter("model.encoder.modules_to_save.default.patch_embed.proj.weight"),
                               after)


def test_slice_lora_and_token_rows_are_fp32_under_a_bf16_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = load_experiment_config("tiny_slice", REAL_DTYPE)
    family = get_family("slice")
    out = family.init(exp, tmp_path / "slice")  # base weights + processor, as the trainer's base_model folder
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model, processor = family.load(out, "sdpa")
    model = setup_trainable(model, exp.train, family.module_paths(model), family.new_token_ids(model, processor))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n for n, _ in trainable) and any("lora_" in n for n, _ in trainable)
    assert all(p.dtype == torch.float32 for _, p in trainable)
    assert model.get_base_model().model.language_model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    with torch.no_grad():  # a non-zero update below bf16 resolution, so the reload is checked on exact values
        for _, p in trainable:
            p.add_(1e-5)
    model.save_pretrained(out)  # the adapter beside the base weights, as a LoRA checkpoint holds them
    reloaded, _ = family.load(out, "sdpa")
    want = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters()}
    got = dict(reloaded.named_parameters())
    assert {n: p.dtype for n, p in got.items()} == {n: p.dtype for n, p in want.items()}
    for name, p in trainable:
        torch.testing.assert_close(got[name.removeprefix("base_model.model.")], p, rtol=0, atol=0)


# model.dtype bfloat16 with the language model trained in full (the tiny presets' train.language_model: full).
FULL_LM = ["model.dtype=bfloat16", "train.bf16=auto", "train.report_to=[]", "train.dataloader_num_workers=0",
           "train.logging_steps=1", "train.max_steps=1", "train.per_device_batch_size=2", "train.learning_rate=1e-5",
           "train.lr_scheduler=constant", "train.warmup_ratio=0", "train.save_steps=100"]


def _moved_below_bf16(before: torch.Tensor, after: torch.Tensor) -> bool:
    """One small AdamW step moved the weight, by less than bfloat16 keeps for most entries."""
    return bool((after != before).any()) and bool((after.bfloat16() == before.bfloat16()).float().mean() > 0.5)


def test_3d_full_language_model_under_bf16_saves_float32_and_reloads_it_exactly(
        tmp_path: Path, release: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = load_experiment_config("tiny_3d", [*FULL_LM, f"train.data_dir={release}", f"train.output_dir={tmp_path / 'run'}",
                                             "train.language_model=full", "model.language_model.tiny.num_hidden_layers=1"])
    family = get_family("3d")
    untrained, _ = family.build(exp, "sdpa")
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    before = untrained.get_parameter(key).detach().float().clone()
    assert untrained.get_parameter(key).dtype == torch.bfloat16
    result = run_training(exp)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # every part of tiny_3d trains

    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    # The folder holds only float32 weights and says so, also in the language model's own config.
    assert config["dtype"] == config["text_config"]["dtype"] == "float32" and config.get("float32_modules") is None
    saved = load_file(str(final / "model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert _moved_below_bf16(before, saved[key])  # a bfloat16 reload would have lost this step

    reloaded, _ = family.load(final, "sdpa")
    state = reloaded.state_dict()
    for name, value in saved.items():
        assert state[name].dtype == torch.float32, name
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


def test_slice_full_language_model_under_bf16_reloads_float32_beside_the_bf16_vision_tower(
        tmp_path: Path, release: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exp = load_experiment_config("tiny_slice", [*FULL_LM, f"train.data_dir={release}",
                                                f"train.output_dir={tmp_path / 'run'}", "train.language_model=full"])
    result = run_training(exp)
    trained = dict(result.model.named_parameters())
    assert {p.dtype for n, p in trained.items() if n.startswith("model.visual.")} == {torch.bfloat16}  # frozen
    assert {p.dtype for n, p in trained.items() if not n.startswith("model.visual.")} == {torch.float32}

    final = tmp_path / "run" / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["dtype"] == "bfloat16"  # the frozen vision tower's
    assert set(config["float32_modules"]) >= {"model.language_model"}
    saved = load_file(str(final / "model.safetensors"))  # Qwen2.5-VL's file layout: model.layers..., visual...
    assert saved["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert saved["visual.blocks.0.mlp.up_proj.weight"].dtype == torch.bfloat16

    reloaded, _ = get_family("slice").load(final, "sdpa")
    got = dict(reloaded.named_parameters())
    assert {n: p.dtype for n, p in got.items()} == {n: p.dtype for n, p in trained.items()}
    for name, p in trained.items():
        torch.testing.assert_close(got[name], p.detach(), rtol=0, atol=0, msg=name)
    assert reloaded.config.dtype == torch.bfloat16
