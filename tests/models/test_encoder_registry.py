"""Adding an encoder touches one file: this test registers a toy encoder and trains a 3D model with it.

Nothing outside this file names the toy: the experiment selects it with ``model.encoder.encoder_type``, the
processor counts its tokens from its config, and its block joins the model's ``_no_split_modules`` (which
accelerate's FSDP auto-wrap and device maps read).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from reasonknee3d.families import get_family, load_experiment_config
from reasonknee3d.models.reasonknee3d.encoders import ENCODERS, EncoderConfig, register_encoder


class ToyMeanConfig(EncoderConfig):
    """Mean-pools cubes of ``cube`` voxels and embeds each with one linear layer."""

    model_type = "reasonknee3d_encoder_toy_mean"
    encoder_type: str = "toy_mean"
    cube: int = 8

    @property
    def input_multiple(self) -> tuple[int, int, int]:
        return (self.cube,) * 3

    def grid_for(self, volume_shape):
        return tuple(s // self.cube for s in volume_shape)


class ToyBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.linear(x))


class ToyMeanEncoder(PreTrainedModel):
    config: ToyMeanConfig
    main_input_name = "volumes"
    _no_split_modules = ["ToyBlock"]
    _supports_sdpa = True  # no attention of its own: any implementation the language model uses is fine

    def __init__(self, config: ToyMeanConfig) -> None:
        super().__init__(config)
        self.embed = nn.Linear(1, config.hidden_size)
        self.block = ToyBlock(config.hidden_size)
        self.post_init()

    def forward(self, volumes: torch.Tensor):
        pooled = nn.functional.avg_pool3d(volumes.to(self.embed.weight.dtype), self.config.cube)  # (B, 1, D, H, W)
        grid = tuple(pooled.shape[2:])
        return self.block(self.embed(pooled.flatten(2).transpose(1, 2))), grid


if "toy_mean" not in ENCODERS:
    register_encoder("toy_mean", ToyMeanConfig)(ToyMeanEncoder)


def test_a_registered_encoder_trains_inside_the_3d_model(tmp_path) -> None:
    exp = load_experiment_config("tiny_3d", [
        'model.encoder={"encoder_type": "toy_mean", "cube": 8, "hidden_size": 32}', "model.region_size=null",
        'model.language_model.tiny={"hidden_size": 32, "intermediate_size": 64, "bpe_vocab_size": 300}'])
    family = get_family(exp.family)
    # data.input_shape 32 x 64 x 64 -> a 4 x 8 x 8 grid, one token per cube.
    assert family.num_visual_tokens(exp, exp.data.input_shape) == 4 * 8 * 8
    torch.manual_seed(0)
    model, processor = family.build(exp, "sdpa")
    assert isinstance(model.model.encoder, ToyMeanEncoder)
    assert processor.num_visual_tokens == model.config.num_visual_tokens == 256
    assert {"ToyBlock", "Qwen2_5_VLDecoderLayer"} <= set(model._no_split_modules)
    batch = family.example_batch(model, processor, torch.randn(*exp.data.input_shape), "Where?", "Final diagnosis: {}")
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.encoder.embed.weight.grad.abs().sum() > 0
    # The saved config names the encoder, so the folder reloads with it.
    model.save_pretrained(tmp_path / "m")
    reloaded = type(model).from_pretrained(tmp_path / "m")
    assert isinstance(reloaded.model.encoder, ToyMeanEncoder) and reloaded.config.encoder_config.cube == 8


def test_the_vit3d_block_is_the_fsdp_unit_of_the_shipped_configs() -> None:
    exp = load_experiment_config("tiny_3d")
    model, _ = get_family(exp.family).build(exp, "sdpa")
    assert {"ViT3DBlock", "Qwen2_5_VLDecoderLayer"} <= set(model._no_split_modules)
