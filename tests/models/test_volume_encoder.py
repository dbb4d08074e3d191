"""3D ViT encoder: shapes, position-embedding resampling, attention backends, gradients everywhere."""
from __future__ import annotations

import pytest
import torch

from reasonknee3d.models.reasonknee3d.encoders import ViT3DConfig, ViT3DEncoder
from reasonknee3d.models.reasonknee3d.encoders.vit3d import sincos_3d


def _encoder(**kw) -> ViT3DEncoder:
    torch.manual_seed(0)
    cfg = dict(input_size=[8, 16, 16], patch_size=[2, 8, 8], hidden_size=24, num_hidden_layers=2,
               num_attention_heads=3, intermediate_size=48)
    cfg.update(kw)
    return ViT3DEncoder(ViT3DConfig(**cfg))


def test_output_is_one_feature_per_patch_in_grid_order():
    enc = _encoder()
    feats, grid = enc(torch.randn(2, 1, 8, 16, 16))
    assert grid == (4, 2, 2) and feats.shape == (2, 16, 24)
    # Token order is (d, h, w) row-major: a change inside one patch moves exactly that patch's token.
    x = torch.zeros(1, 1, 8, 16, 16)
    x[0, 0, 0:2, 0:8, 8:16] = 1.0  # patch (d=0, h=0, w=1) -> token index 1 in grid order
    tokens, _ = enc.patch_embed(x)
    base, _ = enc.patch_embed(torch.zeros_like(x))
    changed = (tokens - base).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_every_parameter_gets_a_finite_nonzero_gradient(pos_embed):
    enc = _encoder(pos_embed=pos_embed)
    feats, _ = enc(torch.randn(2, 1, 8, 16, 16))
    (feats ** 2).mean().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name} has a zero/non-finite gradient"


@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_other_grids_resample_the_position_embedding(pos_embed):
    enc = _encoder(pos_embed=pos_embed)
    feats, grid = enc(torch.randn(1, 1, 12, 32, 16))
    assert grid == (6, 4, 2) and feats.shape == (1, 48, 24)
    if pos_embed == "learned":
        native = enc.position_embedding((4, 2, 2))
        assert torch.equal(native, enc.pos_embed.flatten(2)[0].T)  # no resampling on the native grid


def test_sincos_positions_are_distinct():
    pe = sincos_3d((4, 3, 5), 36)
    assert pe.shape == (60, 36)
    assert torch.cdist(pe, pe).add(torch.eye(60) * 1e9).min() > 1e-3


def test_sdpa_and_eager_attention_agree():
    enc = _encoder()
    x = torch.randn(2, 1, 8, 16, 16)
    enc.config._attn_implementation = "sdpa"
    a, _ = enc(x)
    enc.config._attn_implementation = "eager"
    b, _ = enc(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_bad_inputs_name_the_shape():
    enc = _encoder()
    with pytest.raises(ValueError, match=r"\(1, 1, 9, 16, 16\)"):
        enc(torch.randn(1, 1, 9, 16, 16))
    with pytest.raises(ValueError, match="not divisible by the vit3d encoder's input multiple"):
        ViT3DConfig(input_size=[10, 16, 16], patch_size=[4, 8, 8])
    with pytest.raises(ValueError, match="pos_embed 'rope'"):
        ViT3DConfig(pos_embed="rope")


def test_float16_cache_volumes_are_cast_to_the_model_dtype():
    # The Dataset hands over the cache's float16 arrays; the patch embedding casts them (one place).
    enc = _encoder()
    x = torch.randn(1, 1, 8, 16, 16).half()
    feats, _ = enc(x)
    ref, _ = enc(x.float())
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, ref)
