"""Volume encoders of the 3D-native model, selectable by ``encoder_type`` (see ``base.py``)."""
from .base import ENCODERS, EncoderConfig, Grid, build_encoder, encoder_config, register_encoder
from .vit3d import ViT3DConfig, ViT3DEncoder

__all__ = ["ENCODERS", "EncoderConfig", "Grid", "ViT3DConfig", "ViT3DEncoder", "build_encoder", "encoder_config",
           "register_encoder"]
