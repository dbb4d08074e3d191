"""Attention backend selection: flash-attn only where it can run, SDPA otherwise."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from reasonknee3d import attention


@pytest.mark.parametrize("has_pkg,has_cuda,expected", [(True, True, "flash_attention_2"), (True, False, "sdpa"),
                                                        (False, True, "sdpa"), (False, False, "sdpa")])
def test_auto_and_flash_fall_back_to_sdpa(monkeypatch, has_pkg, has_cuda, expected):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if has_pkg else None) if name == "flash_attn"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    assert attention.select_attn_implementation("auto") == expected
    assert attention.select_attn_implementation("flash_attention_2") == expected


def test_explicit_choices_are_kept():
    assert attention.select_attn_implementation("sdpa") == "sdpa"
    assert attention.select_attn_implementation("eager") == "eager"


def test_unknown_name_is_rejected():
    with pytest.raises(ValueError, match="'flash3'.*expected one of"):
        attention.select_attn_implementation("flash3")


def test_models_load_without_hub_kernels(tiny_qwen_dir, rk3d_dir):
    """transformers kernelizes loaded models by default, and on CUDA then downloads hub layers (an error on a GPU
    node without Hub access). Every loader of the package turns that off; an explicit use_kernels=True still
    opts in. (Plain transformers loads the same folder kernelized: the check can fail.)"""
    from transformers import AutoModel, AutoModelForImageTextToText

    from reasonknee3d.evaluation.zeroshot import _load_hf
    from reasonknee3d.families import get_family
    from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration
    from reasonknee3d.models.slice import modeling_slice

    assert AutoModelForImageTextToText.from_pretrained(tiny_qwen_dir).use_kernels  # transformers' default
    assert not modeling_slice._load_pretrained(tiny_qwen_dir, torch.float32, "sdpa")[0].use_kernels
    assert not _load_hf(tiny_qwen_dir, "sdpa")[0].use_kernels
    assert not ReasonKnee3DForConditionalGeneration.from_pretrained(rk3d_dir).use_kernels
    assert not AutoModel.from_pretrained(rk3d_dir).use_kernels
    assert not get_family("3d").load(rk3d_dir, "sdpa")[0].use_kernels
    assert ReasonKnee3DForConditionalGeneration.from_pretrained(rk3d_dir, use_kernels=True).use_kernels
