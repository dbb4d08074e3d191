"""Volume encoders of the 3D-native model, selectable by ``encoder_type`` (see ``base.py``)."""
from .base import (ENCODERS, EncoderConfig, Grid, build_encoder, encoder_config, init_encoder_from_files,
                   register_encoder)
from .vit3d import ViT3DConfig, ViT3DEncoder
from .swin3d import Swin3DConfig, Swin3DEncoder
from .inflated_vit import InflatedViTConfig, InflatedViTEncoder

__all__ = ["ENCODERS", "EncoderConfig", "Grid", "InflatedViTConfig", "InflatedViTEncoder", "Swin3DConfig",
           "Swin3DEncoder", "ViT3DConfig", "ViT3DEncoder", "build_encoder", "encoder_config", "init_encoder_from_files",
           "register_encoder"]
