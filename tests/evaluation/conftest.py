"""Fixtures shared by the evaluation tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest


@pytest.fixture(scope="session")
def tiny_3d_model_dir() -> Callable[[Path, dict[str, Any]], Path]:
    """``make(folder, data)``: a saved random tiny 3D-native model (K = 32 bins) with preprocessing ``data``."""
    from reasonknee3d.models import save_model_dir
    from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import build_reasonknee3d

    def make(folder: Path, data: dict[str, Any]) -> Path:
        model, processor = build_reasonknee3d(
            {"language_model": {"tiny": {"hidden_size": 32, "intermediate_size": 64, "bpe_vocab_size": 300}},
             "encoder": {"patch_size": [4, 8, 8], "hidden_size": 16, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "intermediate_size": 32},
             "projector": {"projector_type": "pool3d_mlp", "pool_kernel": [1, 2, 2]}, "num_bins": 32}, data)
        return save_model_dir(model, processor, folder)

    return make
