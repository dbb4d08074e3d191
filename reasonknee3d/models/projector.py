"""Projectors from encoder patch features to language-model embeddings, in a registry by name.

Every projector reports, from the patch grid alone, the token grid it emits (``output_grid``) and its
token count (``num_output_tokens``), so the processor expands the right number of placeholders and the
model lays out M-RoPE positions without running anything. Add a projector by subclassing ``Projector``
and registering it with ``@register_projector("name")``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_reasonknee3d import ProjectorConfig

Grid = tuple[int, int, int]

PROJECTORS: dict[str, type["Projector"]] = {}


def register_projector(name: str) -> Callable[[type["Projector"]], type["Projector"]]:
    def add(cls: type[Projector]) -> type[Projector]:
        if name in PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered ({PROJECTORS[name].__name__})")
        PROJECTORS[name] = cls
        return cls
    return add


class Projector(nn.Module):
    """Base: ``forward(features (B, D*H*W, C_in), grid (D, H, W)) -> (B, N_out, C_out)`` in grid order."""

    @classmethod
    def output_grid(cls, grid: Grid, config: ProjectorConfig) -> Grid:
        return tuple(grid)

    @classmethod
    def num_output_tokens(cls, grid: Grid, config: ProjectorConfig) -> int:
        return math.prod(cls.output_grid(grid, config))


def _mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Sequential:
    # The LLaVA-1.5 projector: Linear -> GELU -> Linear.
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


@register_projector("mlp2x_gelu")
class MLP2xGELUProjector(Projector):
    """One language-model token per encoder patch."""

    def __init__(self, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = _mlp2x_gelu(in_dim, out_dim)

    def forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        return self.mlp(features)


@register_projector("pool3d_mlp")
class Pool3DMLPProjector(Projector):
    """Average-pool the patch grid by ``pool_kernel`` (stride = kernel), then the 2-layer GELU MLP.

    The grid must be divisible by the kernel: a partial window would silently describe less tissue.
    """

    def __init__(self, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.kernel = tuple(config.pool_kernel)
        self.mlp = _mlp2x_gelu(in_dim, out_dim)

    @classmethod
    def output_grid(cls, grid: Grid, config: ProjectorConfig) -> Grid:
        bad = [(g, k) for g, k in zip(grid, config.pool_kernel) if g % k]
        if bad:
            raise ValueError(f"pool3d_mlp: patch grid {tuple(grid)} is not divisible by pool_kernel "
                             f"{tuple(config.pool_kernel)} (grid, kernel) {bad}")
        return tuple(g // k for g, k in zip(grid, config.pool_kernel))

    def forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        b, n, c = features.shape
        x = features.transpose(1, 2).reshape(b, c, *grid)  # (B, C, D, H, W)
        x = F.avg_pool3d(x, kernel_size=self.kernel, stride=self.kernel)
        x = x.flatten(2).transpose(1, 2)  # (B, D'*H'*W', C)
        return self.mlp(x)


def build_projector(config: ProjectorConfig, in_dim: int, out_dim: int) -> Projector:
    """The registered projector named by ``config.projector_type``."""
    try:
        cls = PROJECTORS[config.projector_type]
    except KeyError:
        raise ValueError(f"unknown projector_type {config.projector_type!r}; expected one of "
                         f"{sorted(PROJECTORS)}") from None
    return cls(config, in_dim, out_dim)
