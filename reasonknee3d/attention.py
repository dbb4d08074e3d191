"""Which attention kernel to use: one decision shared by both model families and the trainer.

flash-attn is an optional extra that cannot even be built without a CUDA toolkit, so it is selected only
when it is importable *and* a CUDA device is present; everything else runs on PyTorch's SDPA, which
dispatches to its own fused kernels. ``eager`` (plain matmul + softmax) is kept for debugging.
"""
from __future__ import annotations

import importlib.util

import torch

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")


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
