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
