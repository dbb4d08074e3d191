"""Mixed precision of trained models: float32 master weights for what trains, the configured dtype for the rest.

With ``model.dtype: bfloat16`` every weight would otherwise be a bfloat16 parameter. Trainer's ``bf16`` flag only
autocasts; it keeps no float32 copy, so an AdamW step smaller than a bfloat16 spacing (about 0.4 % of the
weight) rounds away, which is most steps at learning rates near 1e-5. So the parameters that train (encoder,
projectors, LoRA, rows of added tokens) are float32 and are saved as float32, the frozen weights keep the
configured dtype, and the arithmetic runs in bfloat16 under autocast where the device supports it.

``keep_trainable_in_fp32`` applies this to a model set up for training; ``restore_adapter_precision`` brings a
folder's embedded adapter back at the precision it was saved in (transformers' ``from_pretrained`` creates the
adapter weights in the base layers' dtype and rounds the saved float32 values into them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def keep_trainable_in_fp32(model: nn.Module) -> int:
    """Cast every parameter with ``requires_grad`` to float32 in place (tied parameters once); returns how many
    parameters changed dtype. The optimizer must be created afterwards."""
    n = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            n += 1
    return n


def _adapter_file_key(name: str, adapter: str) -> str | None:
    """Key in peft's saved adapter file of the model parameter ``name`` (None: not a weight of ``adapter``).

    peft saves ``...q_proj.lora_A.<adapter>.weight`` as ``...q_proj.lora_A.weight``, a fully trained module's copy
    ``...encoder.modules_to_save.<adapter>.x`` as ``...encoder.x`` and trainable token rows
    ``...token_adapter.trainable_tokens_delta.<adapter>`` as ``...token_adapter.trainable_tokens_delta``.
    """
    parts = name.split(".")
    if adapter not in parts:
        return None
    return ".".join(p for p in parts if p not in (adapter, "modules_to_save"))


def restore_adapter_precision(model: nn.Module, model_dir: str | os.PathLike, adapter: str = "default") -> int:
    """Give the weights of the adapter ``model`` loaded from ``model_dir`` the dtype and exact values stored in its
    ``adapter_model.safetensors`` (float32 for what trained); returns how many parameters were restored.

    A folder without an adapter, or a model without one attached, is left as it is. Trainable token rows are also
    switched to the layer that does not copy the embedding (``token_rows``).
    """
    from safetensors import safe_open

    from .token_rows import gather_token_rows

    path = Path(model_dir) / ADAPTER_WEIGHTS
    if not path.is_file() or not getattr(model, "_hf_peft_config_loaded", False):
        return 0
    gather_token_rows(model)
    restored = 0
    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
        for name, param in model.named_parameters():
            key = _adapter_file_key(name, adapter)
            if key is None:
                continue
            file_key = next((k for k in (key, f"base_model.model.{key}") if k in stored), None)
            if file_key is None:
                continue
            value = f.get_tensor(file_key)
            if value.dtype == param.dtype or value.shape != param.shape:
                continue
            param.data = value.to(param.device)
            restored += 1
    return restored


def autocast_like(module_dtype: torch.dtype, device: torch.device) -> Any:
    """Autocast to ``module_dtype`` on a CUDA device when it is a half type, else a no-op context.

    Float32 parts of a bfloat16 model (the 3D encoder and projectors) then compute in bfloat16 on GPU, as they do
    under Trainer's ``bf16`` flag; on CPU they stay in float32.
    """
    import contextlib
    if device.type == "cuda" and module_dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=module_dtype)
    return contextlib.nullcontext()
