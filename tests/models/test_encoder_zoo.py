"""The encoders behind ``model.encoder.encoder_type``: swin3d (MONAI's 3D Swin) and inflated_vit (a 2D timm ViT
inflated to 3D), alone and inside the 3D model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from reasonknee3d.config import ConfigError
from reasonknee3d.families import get_family, load_experiment_config
from reasonknee3d.models.reasonknee3d.encoders import (InflatedViTConfig, InflatedViTEncoder, Swin3DConfig,
                                                       Swin3DEncoder, build_encoder, encoder_config)
from reasonknee3d.models.reasonknee3d.encoders.inflated_vit import inflate_vit2d

TINY_LM = 'model.language_model.tiny={"hidden_size": 32, "intermediate_size": 64, "bpe_vocab_size": 300}'


def _swin(**kw) -> Swin3DConfig:
    base = dict(input_size=(32, 64, 64), hidden_size=32, patch_size=(2, 4, 4), depths=(1, 1), num_heads=(1, 2),
                window_size=(4, 4, 4))
    return Swin3DConfig(**{**base, **kw})


# --- swin3d -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, shape", [
    ({}, (32, 64, 64)),
    ({}, (16, 64, 64)),  # the tiny config's region-look crop
    (dict(depths=(1,), num_heads=(2,), hidden_size=16, patch_size=(4, 8, 8)), (8, 32, 48)),
    (dict(depths=(1, 1, 1), num_heads=(1, 1, 2), hidden_size=32, patch_size=(1, 2, 2), window_size=(2, 2, 2)),
     (16, 32, 48)),
])
def test_swin3d_grid_for_and_width_agree_with_forward(kw, shape) -> None:
    config = _swin(input_size=shape, **kw)
    torch.manual_seed(0)
    encoder = build_encoder(config).eval()
    features, grid = encoder(torch.randn(2, 1, *shape))
    assert grid == config.grid_for(shape) == config.grid_size
    assert features.shape == (2, math.prod(grid), config.hidden_size)
    # input_multiple = patch x 2**stages: the grid is the volume divided by it, exactly.
    assert all(s == g * m for s, g, m in zip(shape, grid, config.input_multiple))
    assert config.embed_dim * 2 ** len(config.depths) == config.hidden_size


def test_swin3d_is_monai_swin_and_names_its_block() -> None:
    from monai.networks.nets.swin_unetr import SwinTransformer, SwinTransformerBlock
    encoder = build_encoder(_swin())
    assert isinstance(encoder.swin, SwinTransformer)
    assert "SwinTransformerBlock" in encoder._no_split_modules
    assert any(isinstance(m, SwinTransformerBlock) for m in encoder.modules())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_swin3d_every_parameter_gets_a_gradient(checkpointing) -> None:
    # Three stages: the last one's patch merging (norm + reduction) feeds the output, so it trains too.
    config = _swin(depths=(2, 1, 1), num_heads=(1, 1, 2), patch_size=(1, 2, 2), window_size=(2, 2, 2),
                   input_size=(16, 32, 32))
    torch.manual_seed(0)
    encoder = build_encoder(config).train()
    if checkpointing:
        encoder.activation_checkpointing_enable()
    features, _ = encoder(torch.randn(2, 1, 16, 32, 32))
    features.pow(2).mean().backward()
    missing = [n for n, p in encoder.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert any("layers3.0.downsample" in n for n, _ in encoder.named_parameters())


def test_swin3d_checkpointing_gives_the_same_gradients() -> None:
    config = _swin()
    grads = []
    x = torch.randn(1, 1, 32, 64, 64)
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = build_encoder(config).train()
        if checkpointing:
            encoder.activation_checkpointing_enable()
        encoder(x)[0].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("kw, match", [
    (dict(input_size=(20, 64, 64)), "input multiple"),
    (dict(hidden_size=30), "divisible by 2\\*\\*2"),
    (dict(num_heads=(3, 2)), "heads"),
    (dict(num_heads=(1,)), "one entry per stage"),
    (dict(depths=(1, 1, 1, 1, 1), num_heads=(1,) * 5), "1 to 4"),
])
def test_swin3d_config_errors_name_the_setting(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        _swin(**kw)


def test_swin3d_rejects_a_volume_off_its_input_multiple() -> None:
    with pytest.raises(ValueError, match="input multiple"):
        build_encoder(_swin())(torch.randn(1, 1, 32, 64, 60))


# --- inflated_vit ---------------------------------------------------------------------------------------

def random_timm_vit(hidden: int = 32, layers: int = 2, patch: int = 8, grid: int = 4, mlp: int = 64,
                    in_chans: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the layout of timm's ``VisionTransformer`` (class token, pos_embed with its entry)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {"cls_token": r(1, 1, hidden), "pos_embed": r(1, 1 + grid * grid, hidden),
          "patch_embed.proj.weight": r(hidden, in_chans, patch, patch, scale=0.05), "patch_embed.proj.bias": r(hidden),
          "norm.weight": 1 + r(hidden), "norm.bias": r(hidden), "head.weight": r(10, hidden), "head.bias": r(10)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(hidden), p + "norm1.bias": r(hidden),
                   p + "attn.qkv.weight": r(3 * hidden, hidden), p + "attn.qkv.bias": r(3 * hidden),
                   p + "attn.proj.weight": r(hidden, hidden), p + "attn.proj.bias": r(hidden),
                   p + "norm2.weight": 1 + r(hidden), p + "norm2.bias": r(hidden),
                   p + "mlp.fc1.weight": r(mlp, hidden), p + "mlp.fc1.bias": r(mlp),
                   p + "mlp.fc2.weight": r(hidden, mlp), p + "mlp.fc2.bias": r(hidden)})
    return sd


def vit2d_patch_tokens(sd: dict[str, torch.Tensor], image: torch.Tensor, heads: int) -> torch.Tensor:
    """The 2D ViT of ``sd`` on ``image`` (C, H, W), patch tokens only (no class token): (h*w, hidden).

    Written from the timm layout with plain torch ops, independent of the package's ViT code.
    """
    w = sd["patch_embed.proj.weight"]
    x = F.conv2d(image[None], w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2)[0].T  # (N, C)
    n, c = x.shape
    x = x + sd["pos_embed"][0, 1:]
    d = c // heads
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        h = F.layer_norm(x, (c,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).view(n, 3, heads, d).permute(1, 2, 0, 3)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v  # (heads, N, d)
        x = x + F.linear(att.transpose(0, 1).reshape(n, c), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (c,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"),
                         p("mlp.fc2.bias"))
        i += 1
    return F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def _inflated(path, depth: int, t: int, mode: str, **kw) -> InflatedViTEncoder:
    config = InflatedViTConfig(input_size=(depth * t, 32, 32), patch_size=(t, 8, 8), hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               init_from_2d=str(path), inflation=mode, **kw)
    encoder = build_encoder(config).eval()
    encoder.init_from_files()
    return encoder


@pytest.fixture(scope="module")
def vit2d_file(tmp_path_factory):
    sd = random_timm_vit()
    path = tmp_path_factory.mktemp("vit2d") / "vit_tiny.safetensors"
    save_file(sd, str(path))
    return sd, path


@settings(max_examples=12, deadline=None)
@given(depth=st.integers(1, 3), t=st.integers(1, 3), mode=st.sampled_from(["central", "mean"]),
       seed=st.integers(0, 2 ** 16))
def test_inflated_vit_on_identical_slices_equals_the_2d_vit(vit2d_file, depth, t, mode, seed) -> None:
    sd, path = vit2d_file
    encoder = _inflated(path, depth, t, mode)
    gray = torch.randn(32, 32, generator=torch.Generator().manual_seed(seed))
    reference = vit2d_patch_tokens(sd, gray.expand(3, -1, -1), heads=2)  # the grey image as RGB
    with torch.no_grad():
        features, grid = encoder(gray.expand(1, 1, depth * t, -1, -1).contiguous())
    assert grid == (depth, 4, 4)
    # Every depth row of the 3D grid is the 2D ViT's output on that image (so is their mean: the pooling).
    rows = features[0].view(depth, 16, 32)
    for d in range(depth):
        torch.testing.assert_close(rows[d], reference, atol=2e-5, rtol=1e-4)
    # Slices that are not all the same image (each one the image shifted by a pixel or more) do not give the 2D
    # ViT's features: the equality above is not a property of any input.
    shifted = torch.stack([gray.roll(k + 1, dims=1) for k in range(depth * t)])[None, None]
    with torch.no_grad():
        other = encoder(shifted)[0][0].view(depth, 16, 32)
    assert not torch.allclose(other.mean(0), reference, atol=1e-3)


def test_inflation_modes_spread_the_kernel_as_documented(vit2d_file) -> None:
    sd, path = vit2d_file
    summed = sd["patch_embed.proj.weight"].sum(1)  # RGB -> one channel
    central = _inflated(path, 1, 3, "central").patch_embed.proj.weight.detach()[:, 0]
    mean = _inflated(path, 1, 3, "mean").patch_embed.proj.weight.detach()[:, 0]
    torch.testing.assert_close(central[:, 1], summed)
    assert central[:, 0].abs().sum() == 0 and central[:, 2].abs().sum() == 0
    for k in range(3):
        torch.testing.assert_close(mean[:, k], summed / 3)


def test_inflated_vit_resizes_the_position_grid_in_plane(tmp_path) -> None:
    sd = random_timm_vit(grid=4)
    config = InflatedViTConfig(input_size=(2, 64, 48), patch_size=(1, 8, 8), hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64)
    pos = inflate_vit2d(sd, config)["pos_embed"]
    assert pos.shape == (1, 32, 2, 8, 6)
    torch.testing.assert_close(pos[:, :, 0], pos[:, :, 1])
    # Bicubic upsampling keeps the mean of the 4 x 4 grid roughly.
    assert (pos.mean((2, 3, 4)) - sd["pos_embed"][0, 1:].mean(0)).abs().max() < 0.1


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd, "hidden_size"),  # the config below is 48 wide, the file 32
    (lambda sd: {**sd, "blocks.0.ls1.gamma": torch.ones(32)}, "no counterpart.*ls1.gamma"),
    (lambda sd: {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}, "1 transformer blocks"),
    (lambda sd: {k: v for k, v in sd.items() if k != "pos_embed"}, "no pos_embed"),
])
def test_inflated_vit_errors_name_the_file_and_key(tmp_path, edit, match) -> None:
    sd = edit(random_timm_vit())
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": sd}, path)
    hidden = 48 if match == "hidden_size" else 32
    config = InflatedViTConfig(input_size=(2, 32, 32), patch_size=(1, 8, 8), hidden_size=hidden, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, init_from_2d=str(path))
    with pytest.raises(ValueError, match=match) as err:
        build_encoder(config).init_from_files()
    assert "vit.pth" in str(err.value)


def test_inflated_vit_config_errors() -> None:
    with pytest.raises(ValueError, match="inflation"):
        InflatedViTConfig(inflation="edge")
    with pytest.raises(ValueError, match="learned"):
        InflatedViTConfig(pos_embed="sincos")
    with pytest.raises(ValueError, match="init_from_2d"):
        build_encoder(InflatedViTConfig()).init_from_files()
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        build_encoder(InflatedViTConfig(init_from_2d="missing.safetensors")).init_from_files()
    with pytest.raises(ValueError, match="unknown key"):
        encoder_config({"encoder_type": "inflated_vit", "inflate": "mean"}, strict=True)


# --- inside the 3D model ----------------------------------------------------------------------------------

def _encoder_overrides(kind: str, tmp_path) -> dict:
    if kind == "swin3d":
        return {"encoder_type": "swin3d", "patch_size": [2, 4, 4], "depths": [1, 1], "num_heads": [1, 2],
                "window_size": [4, 4, 4], "hidden_size": 32}
    path = tmp_path / "vit2d.safetensors"
    save_file(random_timm_vit(patch=16, grid=4), str(path))
    return {"encoder_type": "inflated_vit", "init_from_2d": str(path), "inflation": "mean", "patch_size": [4, 16, 16],
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.mark.parametrize("kind, encoder_class, tokens", [("swin3d", Swin3DEncoder, 4 * 4 * 4),
                                                           ("inflated_vit", InflatedViTEncoder, 8 * 4 * 4)])
def test_encoder_trains_saves_and_reloads_inside_the_3d_model(tmp_path, kind, encoder_class, tokens) -> None:
    import json
    enc = _encoder_overrides(kind, tmp_path)
    exp = load_experiment_config("tiny_3d", [f"model.encoder={json.dumps(enc)}", TINY_LM])  # region look on
    family = get_family(exp.family)
    torch.manual_seed(0)
    model, processor = family.build(exp, "sdpa")
    encoder = model.model.encoder
    assert isinstance(encoder, encoder_class)
    assert family.num_visual_tokens(exp, exp.data.input_shape) == tokens
    assert processor.num_visual_tokens == model.config.num_visual_tokens == tokens
    with torch.no_grad():
        volume = torch.randn(1, 1, *exp.data.input_shape)
        assert model.model.get_volume_features(volume).shape[1] == tokens  # the forward's count
    if kind == "inflated_vit":  # built fresh: the 2D file's weights, inflated
        sd = random_timm_vit(patch=16, grid=4)
        torch.testing.assert_close(encoder.blocks[1].fc2.weight.detach(), sd["blocks.1.mlp.fc2.weight"])
    assert set(type(encoder)._no_split_modules) <= set(model._no_split_modules)

    model.train()
    batch = family.example_batch(model, processor, torch.randn(*exp.data.input_shape), "Where?",
                                 "Location: <|box_start|>[2, 20, 4, 40, 8, 50]<|box_end|>\nFinal diagnosis: {}")
    assert int((batch["input_ids"] == model.config.volume_token_id).sum()) == tokens
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    # The volume and the region crop both run through the encoder: every encoder parameter gets a gradient.
    assert [n for n, p in encoder.named_parameters() if p.grad is None] == []

    model.eval()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    for f in tmp_path.glob("vit2d*"):
        f.unlink()  # a saved model never reads the 2D file again
    reloaded, reprocessor = family.load(tmp_path / "m", "sdpa")
    assert isinstance(reloaded.model.encoder, encoder_class)
    assert reprocessor.num_visual_tokens == tokens
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits)


def test_swin3d_settings_errors_name_the_experiment_key() -> None:
    enc = '{"encoder_type": "swin3d", "depths": [1, 1], "num_heads": [1, 2], "hidden_size": 32, "patch_size": [3, 4, 4]}'
    with pytest.raises(ConfigError, match="model.encoder"):
        load_experiment_config("tiny_3d", [f"model.encoder={enc}", TINY_LM]).model.from_qwen_kwargs([32, 64, 64])
