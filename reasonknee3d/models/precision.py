"""Mixed precision of trained models: float32 master weights for what trains, the configured dtype for the rest.

With ``model.dtype: bfloat16`` every weight would otherwise be a bfloat16 parameter. Trainer's ``bf16`` flag only
autocasts; it keeps no float32 copy, so an AdamW step smaller than a bfloat16 spacing (about 0.4 % of the
weight) rounds away, which is most steps at learning rates near 1e-5. So the parameters that train (encoder,
projectors, LoRA, rows of added tokens) are float32 and are saved as float32, the frozen weights keep the
configured dtype, and the arithmetic runs in bfloat16 under autocast where the device supports it.

``keep_trainable_in_fp32`` applies this to a model set up for training; ``restore_adapter_precision`` brings a
folder's embedded adapter back at the precision it was saved in (transformers' ``from_pretrained`` creates the
adapter weights in the base layers' dtype and rounds the saved float32 values into them).
``describe_saved_precision`` makes a model's config say which of its weights a ``save_pretrained`` writes in
float32 (a fully trained language model under ``model.dtype: bfloat16``), so that loading the folder gives those
weights back in float32 (``float32_patterns``, ``cast_outside_float32_modules``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
FLOAT32_MODULES = "float32_modules"
"""Config attribute: the modules (or single parameters) a folder holds in float32 under a half-precision dtype."""
_HALF = (torch.bfloat16, torch.float16)


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


def _as_dtype(value: Any) -> Any:
    return getattr(torch, value) if isinstance(value, str) and hasattr(torch, value) else value


def _set_config_dtype(config: Any, dtype: torch.dtype) -> None:
    """``dtype`` as the config's and its sub-configs' (text_config, vision_config, ...)."""
    config.dtype = dtype
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "dtype"):
            sub.dtype = dtype


def float32_parts(model: nn.Module) -> list[str]:
    """Names of the shallowest modules (or single parameters) of ``model`` that hold only float32 floating weights,
    when the model also holds weights of another floating dtype; [] when its floating weights share one dtype."""
    def visit(module: nn.Module, prefix: str) -> list[str]:
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        if torch.float32 not in dtypes:
            return []
        if dtypes == {torch.float32}:
            return [prefix]
        found = [f"{prefix}{name}" for name, p in module.named_parameters(recurse=False) if p.dtype == torch.float32]
        for name, child in module.named_children():
            found += visit(child, f"{prefix}{name}.")
        return found

    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) < 2:
        return []
    return [name.rstrip(".") for name in visit(model, "")]


def describe_saved_precision(model: nn.Module, kept: Any = ()) -> None:
    """Make ``model.config`` (written by ``save_pretrained``) say which weights are float32 under a half dtype.

    transformers 5.25 loads a model in ONE dtype, its config's ``dtype`` (per-module dtype mappings are deprecated
    and collapse to one), so a folder whose config says bfloat16 while it holds a fully trained, float32 language
    model (``keep_trainable_in_fp32``) loaded back as bfloat16, silently rounding what was trained. Writing float32
    as the folder's dtype would bring those weights back but also upcast the frozen bfloat16 ones (the slice
    model's vision tower), which then are no longer what was saved and take twice the memory. So:

    - every floating weight float32: the config's ``dtype`` (and its sub-configs') becomes float32, which any
      loader honours;
    - float32 beside half-precision weights: ``dtype`` stays (the frozen weights') and ``config.float32_modules``
      lists the float32 parts (``float32_parts``), which the 3D model keeps float32 when ``from_pretrained``
      materializes them (``float32_patterns`` into ``_keep_in_fp32_modules_strict``), and the slice loader
      (transformers' own Qwen2.5-VL class) loads in float32 and casts the other weights back to the folder's
      dtype (``cast_outside_float32_modules``).

    Either way ``from_pretrained(folder)`` returns exactly the saved weights in their saved dtypes. A model whose
    config dtype is not half precision is left as it is. ``kept``: module names the model class keeps float32 on
    its own (its ``_keep_in_fp32_modules_strict``); parts with such a name in their path are not listed.
    """
    config = getattr(model, "config", None)
    if config is None or _as_dtype(getattr(config, "dtype", None)) not in _HALF:
        return
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes == {torch.float32}:
        _set_config_dtype(config, torch.float32)
        setattr(config, FLOAT32_MODULES, None)
        return
    kept = set(kept)
    parts = [n for n in float32_parts(model) if not kept.intersection(n.split("."))]
    setattr(config, FLOAT32_MODULES, parts or None)


def float32_patterns(names: Any) -> list[str]:
    """``_keep_in_fp32_modules_strict`` entries (regexes searched in each weight's name) for the saved
    ``float32_modules`` names: each names that module's weights, or that one parameter."""
    import re
    return [rf"^{re.escape(n)}(?:\.|$)" for n in names or ()]


def cast_outside_float32_modules(model: nn.Module, names: Any, dtype: torch.dtype) -> int:
    """Cast the floating parameters of ``model`` that lie outside every module (or parameter) named in ``names``
    (a folder's ``config.float32_modules``) to ``dtype`` and record ``dtype`` as the config's; returns how many
    were cast.

    For a model class whose ``from_pretrained`` cannot keep some weights float32 by itself: load the folder in
    float32 (exact for every stored dtype), then cast back what was saved in ``dtype``, which is exact as well.
    """
    names = list(names or ())

    def listed(name: str) -> bool:
        return any(name == n or name.startswith(n + ".") for n in names)

    cast = 0
    for name, param in model.named_parameters():  # a tied parameter once, under its first name
        if param.is_floating_point() and param.dtype != dtype and not listed(name):
            param.data = param.data.to(dtype)
            cast += 1
    config = getattr(model, "config", None)
    if config is not None:
        _set_config_dtype(config, dtype)
    return cast
