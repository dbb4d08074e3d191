"""Projector registry: every projector's declared token count and grid match what it emits."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from reasonknee3d.models.reasonknee3d.projectors import (PROJECTORS, MLP2xGELUConfig, Projector, build_projector,
                                                         projector_config, register_projector)


@pytest.mark.parametrize("name,kernel", [("mlp2x_gelu", [1, 1, 1]), ("pool3d_mlp", [2, 1, 2]),
                                         ("pool3d_mlp", [1, 3, 3])])
def test_declared_token_count_matches_forward(name, kernel):
    cfg = projector_config({"projector_type": name, **({"pool_kernel": kernel} if name == "pool3d_mlp" else {})})
    grid = (4, 6, 6)
    proj = build_projector(cfg, 8, 12)
    out = proj(torch.randn(2, math.prod(grid), 8), grid)
    assert out.shape == (2, PROJECTORS[name].num_output_tokens(grid, cfg), 12)
    assert math.prod(PROJECTORS[name].output_grid(grid, cfg)) == out.shape[1]


def test_pool3d_averages_the_right_blocks_in_grid_order():
    cfg = projector_config({"projector_type": "pool3d_mlp", "pool_kernel": [2, 2, 1]})
    proj = build_projector(cfg, 3, 3)
    proj.mlp = nn.Identity()
    grid = (4, 2, 3)
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(1, -1, 3)
    out = proj(coords.float(), grid)  # (1, 2*1*3, 3): mean (d, h, w) of each pooled block
    expected = torch.tensor([[d * 2 + 0.5, 0.5, w] for d in range(2) for w in range(3)])
    torch.testing.assert_close(out[0], expected)


def test_errors_name_the_offending_values():
    cfg = projector_config({"projector_type": "pool3d_mlp", "pool_kernel": [2, 2, 2]})
    with pytest.raises(ValueError, match=r"\(5, 4, 4\).*\(2, 2, 2\)"):
        PROJECTORS["pool3d_mlp"].output_grid((5, 4, 4), cfg)
    with pytest.raises(ValueError, match="'qformer'.*mlp2x_gelu"):
        projector_config({"projector_type": "qformer"})
    with pytest.raises(ValueError, match="already registered"):
        register_projector("mlp2x_gelu", MLP2xGELUConfig)(Projector)
    with pytest.raises(ValueError, match="projector.pool_sise: unknown key for projector 'pool3d_mlp'"):
        projector_config({"projector_type": "pool3d_mlp", "pool_sise": 2}, strict=True)
