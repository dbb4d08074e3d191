"""Configuration of the 3D-native model: volume encoder, projector and Qwen2.5-VL language model.

Like ``Qwen2_5_VLConfig``, the top config holds one sub-config per part and turns dicts into config
objects, so a saved ``config.json`` rebuilds every part. Each part is built from its own sub-config.
Validation happens here, at construction, so a bad YAML value fails before any weight is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

from ...attention import ATTN_IMPLEMENTATIONS
from ...config import ConfigError
from ..tiny_qwen import QWEN2_5_VL_3B_TEXT, check_language_model
from .encoders import ViT3DConfig, encoder_config
from .projectors import PROJECTORS, MLP2xGELUConfig, projector_config
from .encoders.base import triple

def check_region_size(region_size: Any, multiple: Sequence[int], where: str = "region_size") -> list[int]:
    """The region look's crop size as three ints, each a multiple of the encoder's input multiple on its axis."""
    region = triple(region_size, where)
    if any(r % p for r, p in zip(region, multiple)):
        raise ValueError(f"{where} {region} must be divisible by the encoder's input multiple {list(multiple)} "
                         f"(the region crop goes through the same encoder)")
    return region


class ReasonKnee3DConfig(PreTrainedConfig):
    """3D ViT -> projector -> Qwen2.5-VL text model, with coordinate tokens for boxes.

    Token ids are filled in when the tokenizer is extended (``from_qwen2_5_vl`` / ``init``); a config
    without them can build a model but not splice volumes.
    """

    model_type = "reasonknee3d"
    sub_configs_defaults = {
        # Mappings are turned into the class their encoder_type / projector_type names in __post_init__.
        "encoder_config": ViT3DConfig,
        "projector_config": MLP2xGELUConfig,
        # Default language model: the text part of Qwen2.5-VL-3B.
        "text_config": SubConfigSpec(config_class=Qwen2_5_VLTextConfig, init_kwargs=QWEN2_5_VL_3B_TEXT),
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
    float32_modules: list[str] | None = None
    """Parts a saved folder holds in float32 under a half-precision ``dtype`` beyond the encoder and projectors
    (which always are): written at save time (``models.precision.describe_saved_precision``), kept float32 when the
    folder loads. None: no such parts."""

    def __post_init__(self, **kwargs: Any) -> None:
        if self.encoder_config is not None:
            self.encoder_config = encoder_config(self.encoder_config)
        if self.projector_config is not None:
            self.projector_config = projector_config(self.projector_config)
        super().__post_init__(**kwargs)
        if self.region_size is not None:
            self.region_size = check_region_size(self.region_size, self.encoder_config.input_multiple)
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
        enc = self.encoder_config
        patch_grid = enc.grid_for(enc.input_size if volume_shape is None else volume_shape)
        return PROJECTORS[self.projector_config.projector_type].output_grid(patch_grid, self.projector_config)

    @property
    def visual_grid(self) -> tuple[int, int, int]:
        """Projected token grid of a volume of ``encoder_config.input_size``."""
        return self.visual_grid_for()

    @property
    def num_visual_tokens(self) -> int:
        """Language-model tokens per volume of ``encoder_config.input_size``: known without running the model."""
        proj = PROJECTORS[self.projector_config.projector_type]
        return proj.num_output_tokens(self.encoder_config.grid_size, self.projector_config)


DTYPES = ("float32", "bfloat16", "float16")


def _prefixed(key: str, err: Exception) -> str:
    msg = str(err)
    return f"model.{msg}" if msg.startswith(f"{key}.") else f"model.{key}: {msg}"


@dataclass
class ReasonKnee3DModelArgs:
    """The ``model:`` section of a ``family: 3d`` experiment: what ``from_qwen2_5_vl`` is called with."""

    language_model: dict = field(default_factory=lambda: {"tiny": {}})
    """``{path: DIR}`` (a local Qwen2.5-VL checkpoint) or ``{tiny: {sizes}}`` (``tiny_qwen.TinyQwenSizes``)."""
    encoder: dict = field(default_factory=dict)
    """The encoder config: ``encoder_type`` (default ``vit3d``) and that encoder's settings; ``input_size``
    comes from ``data.input_shape``."""
    projector: dict = field(default_factory=dict)
    """The projector config: ``projector_type`` (default ``mlp2x_gelu``) and that projector's settings."""
    num_bins: int = 64
    """Coordinate bins K per axis of the box tokens."""
    region_size: Optional[list[int]] = None
    """Region look crop (S, H, W), or null for none (``region.py``)."""
    attn_implementation: str = "auto"
    """auto | sdpa | eager | flash_attention_2."""
    dtype: Optional[str] = None
    """Weight dtype of the built model: float32 | bfloat16 | float16; null keeps float32."""

    def __post_init__(self) -> None:
        check_language_model(self.language_model)
        if self.num_bins < 2:
            raise ConfigError(f"model.num_bins: expected >= 2, got {self.num_bins}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"model.attn_implementation: expected one of {ATTN_IMPLEMENTATIONS}, "
                              f"got {self.attn_implementation!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype: expected one of {DTYPES} or null, got {self.dtype!r}")

    def sub_configs(self, input_shape: Sequence[int]) -> tuple[Any, Any]:
        """(encoder config, projector config) for volumes of ``input_shape``; raises ConfigError naming the key."""
        encoder = dict(self.encoder)
        if "input_size" in encoder and list(encoder["input_size"]) != list(input_shape):
            raise ConfigError(f"model.encoder.input_size {encoder['input_size']} differs from data.input_shape "
                              f"{list(input_shape)}; set only data.input_shape")
        encoder["input_size"] = [int(v) for v in input_shape]
        try:
            enc = encoder_config(encoder, strict=True)
        except (TypeError, ValueError) as err:
            raise ConfigError(_prefixed("encoder", err)) from None
        try:
            proj = projector_config(self.projector, strict=True)
            PROJECTORS[proj.projector_type].output_grid(enc.grid_size, proj)
        except (TypeError, ValueError) as err:
            raise ConfigError(_prefixed("projector", err)) from None
        return enc, proj

    def from_qwen_kwargs(self, input_shape: Sequence[int]) -> dict[str, Any]:
        """Keyword arguments of ``from_qwen2_5_vl`` for volumes of ``input_shape`` (all checks run here)."""
        enc, proj = self.sub_configs(input_shape)
        region = None
        if self.region_size is not None:
            try:
                region = check_region_size(self.region_size, enc.input_multiple, "model.region_size")
            except ValueError as err:
                raise ConfigError(str(err)) from None
        return dict(encoder_config=enc, projector_config=proj, num_bins=self.num_bins,
                    attn_implementation=self.attn_implementation, dtype=self.dtype, region_size=region)

    def num_visual_tokens(self, input_shape: Sequence[int]) -> int:
        enc, proj = self.sub_configs(input_shape)
        return PROJECTORS[proj.projector_type].num_output_tokens(enc.grid_size, proj)
