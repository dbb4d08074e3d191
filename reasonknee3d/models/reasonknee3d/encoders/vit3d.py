"""3D ViT volume encoder: Conv3d patch embedding, 3D position embedding, pre-norm transformer blocks.

Written here rather than taken from MONAI because ``monai.networks.nets.ViT`` builds an unused
cross-attention norm in every block (no gradient -> DDP unused-parameter errors) and has no SDPA switch.
Every parameter is used in ``forward``. The position embedding is defined on ``input_size``'s patch grid
and resampled (learned: trilinear; sincos: recomputed) when a volume of another size comes in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .base import EncoderConfig, Grid, register_encoder, triple

POS_EMBED_TYPES = ("learned", "sincos")


class ViT3DConfig(EncoderConfig):
    """3D ViT over a single-channel volume ``(S, H, W)``, cut into non-overlapping patches."""

    model_type = "reasonknee3d_encoder"
    encoder_type: str = "vit3d"

    patch_size: list[int] | tuple[int, ...] = (4, 8, 8)
    """Patch extent per axis; ``input_size`` must be divisible by it."""
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    pos_embed: str = "learned"
    """``learned`` (a parameter on the input grid, trilinearly resampled) or ``sincos`` (fixed, any grid)."""

    def __post_init__(self, **kwargs) -> None:
        self.patch_size = triple(self.patch_size, "encoder_config.patch_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"encoder_config.hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"encoder_config.pos_embed {self.pos_embed!r}: expected one of {POS_EMBED_TYPES}")
        super().__post_init__(**kwargs)

    @property
    def input_multiple(self) -> tuple[int, int, int]:
        return tuple(self.patch_size)

    def grid_for(self, volume_shape) -> Grid:
        return tuple(s // p for s, p in zip(volume_shape, self.patch_size))


def sincos_3d(grid: Grid, dim: int) -> torch.Tensor:
    """Fixed sine-cosine position embedding ``(D*H*W, dim)`` for a (D, H, W) grid, grid order.

    Each axis gets ``2 * (dim // 6)`` channels of 1D sincos (MAE-style); leftover channels are zero.
    """
    per_axis = 2 * (dim // 6)
    if per_axis == 0:
        raise ValueError(f"sincos 3D position embedding needs hidden_size >= 6, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float64) / (per_axis // 2))
    coords = torch.meshgrid(*(torch.arange(g, dtype=torch.float64) for g in grid), indexing="ij")
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * omega  # (N, per_axis/2)
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


class PatchEmbed3D(nn.Module):
    def __init__(self, config: ViT3DConfig) -> None:
        super().__init__()
        self.patch_size = tuple(config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=self.patch_size,
                              stride=self.patch_size)

    def forward(self, volumes: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        bad = [(s, p) for s, p in zip(volumes.shape[2:], self.patch_size) if s % p]
        if volumes.ndim != 5 or bad:
            raise ValueError(f"volumes must be (B, C, S, H, W) with S, H, W divisible by patch_size "
                             f"{self.patch_size}; got shape {tuple(volumes.shape)}")
        x = self.proj(volumes.to(self.proj.weight.dtype))  # (B, C, D, H, W); float16 cache arrays are cast here
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid  # (B, D*H*W, C)


class EncoderAttention(nn.Module):
    """Full (bidirectional) multi-head self-attention over all patches of a volume."""

    is_causal = False

    def __init__(self, config: ViT3DConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.scaling = self.head_dim ** -0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3x (B, h, N, d)
        impl = self.config._attn_implementation or "sdpa"
        if impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling).transpose(1, 2)  # (B, N, h, d)
        elif impl == "eager":
            attn = torch.softmax((q @ k.transpose(-1, -2)) * self.scaling, dim=-1, dtype=torch.float32)
            out = (attn.to(v.dtype) @ v).transpose(1, 2)
        else:
            # flash_attention_2 (and other kernels) through transformers' dispatch table, which imports
            # flash_attn lazily; it takes (B, h, N, d) and returns (B, N, h, d).
            out, _ = ALL_ATTENTION_FUNCTIONS[impl](self, q, k, v, None, scaling=self.scaling, dropout=0.0,
                                                   is_causal=False)
        return self.proj(out.reshape(b, n, c))


class ViT3DBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ViT3DConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = EncoderAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT3DPreTrainedModel(PreTrainedModel):
    config_class = ViT3DConfig
    config: ViT3DConfig
    base_model_prefix = "encoder"
    main_input_name = "volumes"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViT3DBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ViT3DEncoder) and module.pos_embed is not None:
            init.trunc_normal_(module.pos_embed, mean=0.0, std=self.config.initializer_range)


@register_encoder("vit3d", ViT3DConfig)
class ViT3DEncoder(ViT3DPreTrainedModel):
    """``forward(volumes (B, C, S, H, W)) -> (features (B, D*H*W, hidden), grid (D, H, W))``, grid order."""

    def __init__(self, config: ViT3DConfig) -> None:
        super().__init__(config)
        self.patch_embed = PatchEmbed3D(config)
        self.grid_size: Grid = config.grid_size
        # Learned embedding kept as a (1, C, D, H, W) grid so trilinear resampling is one interpolate call.
        self.pos_embed = (nn.Parameter(torch.zeros(1, config.hidden_size, *self.grid_size))
                          if config.pos_embed == "learned" else None)
        self.blocks = nn.ModuleList(ViT3DBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def position_embedding(self, grid: Grid) -> torch.Tensor:
        """``(D*H*W, hidden)`` position embedding for a patch grid, resampled if it differs from the config's."""
        if self.pos_embed is None:
            return sincos_3d(grid, self.config.hidden_size)
        pe = self.pos_embed
        if tuple(grid) != self.grid_size:
            pe = F.interpolate(pe, size=grid, mode="trilinear", align_corners=False)
        return pe.flatten(2)[0].transpose(0, 1)  # (D*H*W, C)

    def forward(self, volumes: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        x, grid = self.patch_embed(volumes.to(self.patch_embed.proj.weight.dtype))
        x = x + self.position_embedding(grid).to(x.device, x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), grid
