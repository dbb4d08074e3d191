"""Which attention kernel to use: one decision shared by both model families and the trainer.

flash-attn is an optional extra that cannot even be built without a CUDA toolkit, so it is selected only
when it is importable *and* a CUDA device is present; everything else runs on PyTorch's SDPA, which
dispatches to its own fused kernels. ``eager`` (plain matmul + softmax) is kept for debugging.
"""
from __future__ import annotations

import importlib.util

import torch

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")


NO_HUB_KERNELS = {"use_kernels": False}
"""``from_pretrained`` keywords of every model this package loads. transformers (5.x) kernelizes a loaded model
by default, and on a CUDA device its ``train()`` / ``eval()`` then fetches replacement layers (e.g. RMSNorm from
``kernels-community/liger-kernels``) from the Hugging Face Hub: a download at run time, and an error on a GPU
node without Hub access (seen on an H200, 2026-12-04). The package promises no network at run time and the same
layers on CPU and GPU, so hub kernels stay off; pass ``use_kernels=True`` to opt in."""


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package is importable and a CUDA device is present."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def select_attn_implementation(requested: str = "auto") -> str:
    """Resolve ``requested`` to a transformers ``attn_implementation`` name.

    ``auto`` and ``flash_attention_2`` give ``flash_attention_2`` only where flash-attn can actually run
    (falling back to ``sdpa`` otherwise, so one config works on a laptop and on a GPU node); ``sdpa`` and
    ``eager`` are returned as asked.
    """
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {requested!r}; expected one of {ATTN_IMPLEMENTATIONS}")
    if requested in ("auto", "flash_attention_2"):
        return "flash_attention_2" if flash_attn_available() else "sdpa"
    return requested
