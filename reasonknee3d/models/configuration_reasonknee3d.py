"""Configuration of the 3D-native model: volume encoder, projector and Qwen2.5-VL language model.

Like ``Qwen2_5_VLConfig``, the top config holds one sub-config per part and turns dicts into config
objects, so a saved ``config.json`` rebuilds every part. Each part is built from its own sub-config.
Validation happens here, at construction, so a bad YAML value fails before any weight is allocated.
"""
from __future__ import annotations

from typing import Any, Sequence

from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

POS_EMBED_TYPES = ("learned", "sincos")


def _triple(value: Any, name: str) -> tuple[int, int, int]:
    """An int or three ints -> a tuple of three positive ints (one per array axis S, H, W)."""
    vals = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(vals) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
        raise ValueError(f"{name} must be a positive int or three positive ints (S, H, W); got {value!r}")
    return vals


def check_region_size(region_size: Any, patch_size: Any, where: str = "region_size") -> list[int]:
    """The region look's crop size as three ints, each a multiple of the encoder's patch size on its axis."""
    region = list(_triple(region_size, where))
    if any(r % p for r, p in zip(region, patch_size)):
        raise ValueError(f"{where} {region} must be divisible by the encoder's patch_size {list(patch_size)} "
                         f"(the region crop goes through the same encoder)")
    return region


class VolumeEncoderConfig(PreTrainedConfig):
    """3D ViT over a single-channel volume ``(S, H, W)``, cut into non-overlapping patches."""

    model_type = "reasonknee3d_encoder"
    base_config_key = "encoder_config"

    input_size: list[int] | tuple[int, ...] = (32, 64, 64)
    """Volume shape (S, H, W) the position embedding is laid out for; other grids are resampled."""
    patch_size: list[int] | tuple[int, ...] = (4, 8, 8)
    """Patch extent per axis; ``input_size`` must be divisible by it."""
    in_channels: int = 1
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    pos_embed: str = "learned"
    """``learned`` (a parameter on the input grid, trilinearly resampled) or ``sincos`` (fixed, any grid)."""
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        self.input_size = list(_triple(self.input_size, "encoder_config.input_size"))
        self.patch_size = list(_triple(self.patch_size, "encoder_config.patch_size"))
        bad = [(s, p) for s, p in zip(self.input_size, self.patch_size) if s % p]
        if bad:
            raise ValueError(f"encoder_config.input_size {self.input_size} is not divisible by patch_size "
                             f"{self.patch_size} (axis size, patch) {bad}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"encoder_config.hidden_size {self.hidden_size} is not divisible by "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.pos_embed not in POS_EMBED_TYPES:
            raise ValueError(f"encoder_config.pos_embed {self.pos_embed!r}: expected one of {POS_EMBED_TYPES}")
        super().__post_init__(**kwargs)

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Patch grid (D, H, W) of ``input_size``."""
        return tuple(s // p for s, p in zip(self.input_size, self.patch_size))


class ProjectorConfig(PreTrainedConfig):
    """Maps encoder patch features to language-model embeddings; ``projector_type`` names a registry entry."""

    model_type = "reasonknee3d_projector"
    base_config_key = "projector_config"

    projector_type: str = "mlp2x_gelu"
    """Key of ``reasonknee3d.models.projector.PROJECTORS``."""
    pool_kernel: list[int] | tuple[int, ...] = (1, 1, 1)
    """``pool3d_mlp``: average-pooling kernel (= stride) over the patch grid (D, H, W)."""

    def __post_init__(self, **kwargs: Any) -> None:
        self.pool_kernel = list(_triple(self.pool_kernel, "projector_config.pool_kernel"))
        # Imported here: projector.py imports this module for the type.
        from .projector import PROJECTORS
        if self.projector_type not in PROJECTORS:
            raise ValueError(f"projector_config.projector_type {self.projector_type!r}: expected one of "
                             f"{sorted(PROJECTORS)}")
        super().__post_init__(**kwargs)


class ReasonKnee3DConfig(PreTrainedConfig):
    """3D ViT -> projector -> Qwen2.5-VL text model, with coordinate tokens for boxes.

    Token ids are filled in when the tokenizer is extended (``from_qwen2_5_vl`` / ``init``); a config
    without them can build a model but not splice volumes.
    """

    model_type = "reasonknee3d"
    sub_configs_defaults = {
        "encoder_config": VolumeEncoderConfig,
        "projector_config": ProjectorConfig,
        # Default language model: the text part of Qwen2.5-VL-3B (the checkpoint's own config.json values).
        "text_config": SubConfigSpec(config_class=Qwen2_5_VLTextConfig, init_kwargs=dict(
            vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
            num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})),
    }

    encoder_config: dict | PreTrainedConfig | None = None
    projector_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    volume_token_id: int | None = None
    """Id of ``<|volume_pad|>``, replaced by one projected feature per token."""
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    box_start_token_id: int | None = None
    box_end_token_id: int | None = None
    num_bins: int = 64
    """K: coordinate bins per axis; boxes are six tokens ``<|coord_0|>..<|coord_{K-1}|>``."""
    coord_token_ids: list[int] | None = None
    """Token id of each bin, ``coord_token_ids[k]`` = ``<|coord_k|>``."""
    tie_word_embeddings: bool = False
    region_size: list[int] | tuple[int, ...] | None = None
    """Region look (S, H, W voxels), or None for none. When set, what lies inside the box just written (the
    box's part of the input volume, resampled to this size, through the same encoder, pooled and projected by
    ``RegionProjector``) is added to the input embedding of its ``<|box_end|>`` and of every token after it
    (``region.py``)."""

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.region_size is not None:
            self.region_size = check_region_size(self.region_size, self.encoder_config.patch_size)
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be >= 2, got {self.num_bins}")
        if self.coord_token_ids is not None and len(self.coord_token_ids) != self.num_bins:
            raise ValueError(f"coord_token_ids has {len(self.coord_token_ids)} ids but num_bins is {self.num_bins}")
        text = self.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        section = (text.rope_parameters or {}).get("mrope_section")
        # Without mrope_section Qwen falls back to [16, 24, 24] (head_dim 128): wrong for any other size.
        if section is None or len(section) != 3 or sum(section) != head_dim // 2:
            raise ValueError(f"text_config.rope_parameters.mrope_section must be three ints summing to "
                             f"head_dim/2 = {head_dim // 2} (depth, row, col); got {section!r}")

    def visual_grid_for(self, volume_shape: Sequence[int] | None = None) -> tuple[int, int, int]:
        """Projected token grid (D, H, W) of a volume ``(S, H, W)`` (default ``encoder_config.input_size``)."""
        from .projector import PROJECTORS
        enc = self.encoder_config
        shape = enc.input_size if volume_shape is None else volume_shape
        patch_grid = tuple(s // p for s, p in zip(shape, enc.patch_size))
        return PROJECTORS[self.projector_config.projector_type].output_grid(patch_grid, self.projector_config)

    @property
    def visual_grid(self) -> tuple[int, int, int]:
        """Projected token grid of a volume of ``encoder_config.input_size``."""
        return self.visual_grid_for()

    @property
    def num_visual_tokens(self) -> int:
        """Language-model tokens per volume of ``encoder_config.input_size``: known without running the model."""
        from .projector import PROJECTORS
        proj = PROJECTORS[self.projector_config.projector_type]
        return proj.num_output_tokens(self.encoder_config.grid_size, self.projector_config)
