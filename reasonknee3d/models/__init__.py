"""Models: ``reasonknee3d/`` (the 3D-native model) and ``slice/`` (the Qwen2.5-VL slice baseline), one folder per
model in the transformers layout, plus the parts both use (chat format, box tokens, constrained generation, the
tiny Qwen checkpoint builder). Nothing here imports ``training``, ``evaluation`` or ``families``.

``register_auto_classes`` teaches the transformers Auto classes the ``reasonknee3d`` model type, so a
directory written by ``save_pretrained`` loads with ``AutoConfig`` / ``AutoModel*`` / ``AutoProcessor``.
The package root calls it once transformers is imported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

_registered = False


def save_model_dir(model: Any, processor: Any, out_dir: str | Path, marker: Optional[dict[str, Any]] = None) -> Path:
    """``save_pretrained`` model and processor into ``out_dir`` atomically (a sibling temp dir, renamed).

    ``marker`` (``io_utils.output_marker``) is written as the folder's ``io_utils.OUTPUT_MARKER``.
    """
    from ..io_utils import OUTPUT_MARKER, atomic_dir, normalize_permissions, write_json
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if marker is not None:
            write_json(tmp / OUTPUT_MARKER, marker)
        normalize_permissions(tmp)  # transformers writes model.safetensors as 0600
    return Path(out_dir)


def register_auto_classes() -> None:
    """Register config, model and processor classes with the transformers Auto factories (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor)

    from .reasonknee3d.configuration_reasonknee3d import ReasonKnee3DConfig
    from .reasonknee3d.encoders import ENCODERS
    from .reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration, ReasonKnee3DModel
    from .reasonknee3d.processing_reasonknee3d import ReasonKnee3DProcessor

    # Encoder and projector configs register themselves with AutoConfig (encoders/base.py, projectors.py).
    AutoConfig.register(ReasonKnee3DConfig.model_type, ReasonKnee3DConfig, exist_ok=True)
    AutoModel.register(ReasonKnee3DConfig, ReasonKnee3DModel, exist_ok=True)
    for config_cls, model_cls in ENCODERS.values():
        AutoModel.register(config_cls, model_cls, exist_ok=True)
    # Registered as both: trainers and peft reach for CausalLM, multimodal pipelines for ImageTextToText.
    AutoModelForImageTextToText.register(ReasonKnee3DConfig, ReasonKnee3DForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(ReasonKnee3DConfig, ReasonKnee3DForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(ReasonKnee3DConfig, ReasonKnee3DProcessor, exist_ok=True)
    _registered = True


# Import transformers only now that register_auto_classes exists: the package root registers on the
# first transformers import, and registration imports this package's submodules. Were that first import
# to happen inside one of those submodules, registration would meet it half-initialized.
import transformers  # noqa: E402,F401
