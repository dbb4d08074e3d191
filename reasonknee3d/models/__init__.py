"""Model families: the 3D-native ReasonKnee3D model and the Qwen2.5-VL slice baseline.

``register_auto_classes`` teaches the transformers Auto classes the ``reasonknee3d`` model type, so a
directory written by ``save_pretrained`` loads with ``AutoConfig`` / ``AutoModel*`` / ``AutoProcessor``.
The package root calls it once transformers is imported.
"""
from __future__ import annotations

_registered = False


def register_auto_classes() -> None:
    """Register config, model and processor classes with the transformers Auto factories (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor)

    from .configuration_reasonknee3d import ProjectorConfig, ReasonKnee3DConfig, VolumeEncoderConfig
    from .modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration, ReasonKnee3DModel
    from .processing_reasonknee3d import ReasonKnee3DProcessor
    from .volume_encoder import VolumeEncoder

    for config_cls in (ReasonKnee3DConfig, VolumeEncoderConfig, ProjectorConfig):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModel.register(ReasonKnee3DConfig, ReasonKnee3DModel, exist_ok=True)
    AutoModel.register(VolumeEncoderConfig, VolumeEncoder, exist_ok=True)
    # Registered as both: trainers and peft reach for CausalLM, multimodal pipelines for ImageTextToText.
    AutoModelForImageTextToText.register(ReasonKnee3DConfig, ReasonKnee3DForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(ReasonKnee3DConfig, ReasonKnee3DForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(ReasonKnee3DConfig, ReasonKnee3DProcessor, exist_ok=True)
    _registered = True


# Import transformers only now that register_auto_classes exists: the package root registers on the
# first transformers import, and registration imports this package's submodules. Were that first import
# to happen inside one of those submodules, registration would meet it half-initialized.
import transformers  # noqa: E402,F401
