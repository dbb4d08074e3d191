"""3D Swin transformer volume encoder: the SwinUNETR backbone (``monai.networks.nets.swin_unetr.SwinTransformer``).

Attention runs inside local windows (shifted every other block), so cost grows linearly with the number of
patches instead of quadratically as in the full-attention ``vit3d``. That lets the first stage work on much
smaller patches for the same budget.

Stages: a Conv3d patch embedding, then ``len(depths)`` stages, each a run of Swin blocks followed by MONAI's
patch merging (2 x 2 x 2 neighbours -> one, channels doubled). The output of the last stage, merging
included (SwinUNETR's bottleneck feature), is flattened in grid order, layer-normed and handed to the
projector. So for ``S`` stages the grid is ``input / (patch_size * 2**S)`` and the width is
``embed_dim * 2**S``; ``hidden_size`` names that output width and fixes ``embed_dim``.

Every parameter takes part in ``forward`` (DDP needs a gradient for each): MONAI's ``SwinTransformer.forward``
is not used, because it returns the normalised output of every stage and always runs four. Here the stages are
called one after another, the last stage's merging feeds the output, and the only normalisation is this
module's own ``norm`` (MONAI's ``proj_out`` normalisation has no parameters). Without ``use_v2`` MONAI builds no
other module.

Windows: MONAI pads each stage's grid to a multiple of ``window_size``; on an axis where a stage's grid is not
larger than the window it shrinks the window to the grid and stops shifting, and its relative-position-bias
lookup is then only a learned per-pair bias, no longer shared across shifts. Pick ``window_size`` no larger
than the last stage's grid (before its merging) at the sizes you run.
"""
from __future__ import annotations

import torch
from monai.networks.nets.swin_unetr import SwinTransformer, WindowAttention
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from .base import EncoderConfig, Grid, register_encoder, triple

MAX_STAGES = 4
"""MONAI's ``SwinTransformer`` builds at most four stages."""


class Swin3DConfig(EncoderConfig):
    """3D Swin transformer over a single-channel volume ``(S, H, W)``; ``hidden_size`` is the last stage's width."""

    model_type = "reasonknee3d_encoder_swin3d"
    encoder_type: str = "swin3d"

    patch_size: list[int] | tuple[int, ...] = (2, 4, 4)
    """Patch extent per axis of the first stage."""
    depths: list[int] | tuple[int, ...] = (2, 2)
    """Swin blocks per stage; its length is the number of stages (1 to 4), each ending in a 2 x 2 x 2 merging."""
    num_heads: list[int] | tuple[int, ...] = (2, 4)
    """Attention heads per stage; stage ``i`` has width ``embed_dim * 2**i``, which each count must divide."""
    window_size: list[int] | tuple[int, ...] = (4, 4, 4)
    """Attention window (in patches of the current stage) per axis."""
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_norm: bool = True
    """LayerNorm after the patch embedding (as in the Swin paper)."""
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self, **kwargs) -> None:
        self.patch_size = triple(self.patch_size, "encoder_config.patch_size")
        self.window_size = triple(self.window_size, "encoder_config.window_size")
        self.depths = [int(d) for d in self.depths]
        self.num_heads = [int(h) for h in self.num_heads]
        if not 1 <= len(self.depths) <= MAX_STAGES or any(d < 1 for d in self.depths):
            raise ValueError(f"encoder_config.depths must be 1 to {MAX_STAGES} positive ints (blocks per stage); "
                             f"got {self.depths}")
        if len(self.num_heads) != len(self.depths):
            raise ValueError(f"encoder_config.num_heads {self.num_heads} must have one entry per stage "
                             f"(depths {self.depths})")
        if self.hidden_size % 2 ** self.num_stages:
            raise ValueError(f"encoder_config.hidden_size {self.hidden_size} must be divisible by 2**{self.num_stages}"
                             f" (each of the {self.num_stages} stages doubles the width)")
        bad = [(i, self.embed_dim * 2 ** i, h) for i, h in enumerate(self.num_heads) if h < 1 or (self.embed_dim * 2 ** i) % h]
        if bad:
            raise ValueError(f"encoder_config.num_heads {self.num_heads}: (stage, width, heads) {bad} - the heads "
                             f"must divide the stage width (embed_dim {self.embed_dim} = hidden_size / 2**stages)")
        super().__post_init__(**kwargs)

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def embed_dim(self) -> int:
        """Width of the patch embedding (MONAI's ``embed_dim``, SwinUNETR's ``feature_size``)."""
        return self.hidden_size // 2 ** self.num_stages

    @property
    def input_multiple(self) -> tuple[int, int, int]:
        # Patch embedding, then one 2x merging per stage: any other size would be padded by MONAI.
        return tuple(p * 2 ** self.num_stages for p in self.patch_size)

    def grid_for(self, volume_shape) -> Grid:
        return tuple(s // m for s, m in zip(volume_shape, self.input_multiple))


class Swin3DPreTrainedModel(PreTrainedModel):
    config_class = Swin3DConfig
    config: Swin3DConfig
    base_model_prefix = "encoder"
    main_input_name = "volumes"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SwinTransformerBlock"]
    # Window attention with its relative-position bias runs MONAI's own kernels (eager in training, SDPA under
    # no_grad) whatever the language model uses, so any implementation the language model selects is fine.
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, WindowAttention):
            init.trunc_normal_(module.relative_position_bias_table, mean=0.0, std=self.config.initializer_range)


@register_encoder("swin3d", Swin3DConfig)
class Swin3DEncoder(Swin3DPreTrainedModel):
    """``forward(volumes (B, C, S, H, W)) -> (features (B, D*H*W, hidden), grid (D, H, W))``, grid order."""

    def __init__(self, config: Swin3DConfig) -> None:
        super().__init__(config)
        kwargs = dict(
            in_chans=config.in_channels, embed_dim=config.embed_dim, window_size=tuple(config.window_size),
            patch_size=tuple(config.patch_size), depths=tuple(config.depths), num_heads=tuple(config.num_heads),
            mlp_ratio=config.mlp_ratio, qkv_bias=config.qkv_bias, drop_path_rate=config.drop_path_rate,
            patch_norm=config.patch_norm, spatial_dims=3, downsample="merging", use_flash_attention=True)
        if torch.empty(0).device.type == "meta":
            # MONAI reads its drop-path schedule with .item(), which a meta default device refuses: build on the
            # CPU, then move the (empty) weights to meta, as a meta-device build (FLOP counting) expects.
            with torch.device("cpu"):
                self.swin = SwinTransformer(**kwargs).to("meta")
        else:
            self.swin = SwinTransformer(**kwargs)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    @property
    def stages(self) -> list[nn.Module]:
        """The ``BasicLayer`` of every stage, in order (MONAI keeps them as ``layers1`` ... ``layers4``)."""
        return [getattr(self.swin, f"layers{i + 1}")[0] for i in range(self.config.num_stages)]

    def forward(self, volumes: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        multiple = self.config.input_multiple
        bad = [(s, m) for s, m in zip(volumes.shape[2:], multiple) if s % m]
        if volumes.ndim != 5 or bad:
            raise ValueError(f"volumes must be (B, C, S, H, W) with S, H, W divisible by the swin3d input multiple "
                             f"{list(multiple)} (patch_size x 2**stages); got shape {tuple(volumes.shape)}")
        # MONAI's blocks checkpoint themselves when use_checkpoint is set; follow transformers' switch.
        checkpoint = self.gradient_checkpointing and self.training
        for stage in self.stages:
            for block in stage.blocks:
                block.use_checkpoint = checkpoint
        x = self.swin.pos_drop(self.swin.patch_embed(volumes.to(self.swin.patch_embed.proj.weight.dtype)))
        for stage in self.stages:
            x = stage(x.contiguous())  # (B, C, D, H, W); the stage's merging halves the grid, doubles C
        grid = tuple(x.shape[2:])
        return self.norm(x.flatten(2).transpose(1, 2)), grid
