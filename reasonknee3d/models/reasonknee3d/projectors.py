"""Projectors from encoder patch features to language-model embeddings, in a registry by name.

Every projector reports, from the patch grid alone, the token grid it emits (``output_grid``) and its
token count (``num_output_tokens``), so the processor expands the right number of placeholders and the
model lays out M-RoPE positions without running anything. Each projector has its own config class (a
``ProjectorConfig`` subclass holding only its parameters). Add a projector by subclassing ``Projector``
and ``ProjectorConfig`` and registering the pair with ``@register_projector("name", NameConfig)``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedConfig

from .encoders.base import Grid, triple


class ProjectorConfig(PreTrainedConfig):
    """Base of the projector configs; ``projector_type`` names the registry entry."""

    model_type = "reasonknee3d_projector_base"
    base_config_key = "projector_config"
    projector_type: str = ""


PROJECTORS: dict[str, type["Projector"]] = {}
PROJECTOR_CONFIGS: dict[str, type[ProjectorConfig]] = {}


def register_projector(name: str, config_class: type[ProjectorConfig]) -> Callable[[type["Projector"]], type["Projector"]]:
    def add(cls: type[Projector]) -> type[Projector]:
        if name in PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered ({PROJECTORS[name].__name__})")
        if config_class.projector_type != name:
            raise ValueError(f"{config_class.__name__}.projector_type is {config_class.projector_type!r}, "
                             f"registered as {name!r}")
        PROJECTORS[name], PROJECTOR_CONFIGS[name] = cls, config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        return cls
    return add


def projector_config(value: ProjectorConfig | dict | None, strict: bool = False,
                     default: str = "mlp2x_gelu") -> ProjectorConfig:
    """The config object of ``value`` (a mapping picks its class by ``projector_type``); ``strict`` rejects
    keys the class does not declare (experiment files; saved config.json files carry transformers' own keys)."""
    if isinstance(value, ProjectorConfig):
        return value
    values = dict(value or {})
    name = values.pop("projector_type", None) or default
    if name not in PROJECTOR_CONFIGS:
        raise ValueError(f"projector_config.projector_type {name!r}: expected one of {sorted(PROJECTOR_CONFIGS)}")
    cls = PROJECTOR_CONFIGS[name]
    values.pop("model_type", None)
    if strict:
        own = sorted({k for c in cls.__mro__ if issubclass(c, ProjectorConfig) for k in c.__annotations__})
        typos = sorted(set(values) - set(own))
        if typos:
            raise ValueError(f"projector.{typos[0]}: unknown key for projector {name!r}; expected some of {own}")
    return cls(**values)


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


class MLP2xGELUConfig(ProjectorConfig):
    model_type = "reasonknee3d_projector"
    projector_type: str = "mlp2x_gelu"


@register_projector("mlp2x_gelu", MLP2xGELUConfig)
class MLP2xGELUProjector(Projector):
    """One language-model token per encoder patch."""

    def __init__(self, config: ProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = _mlp2x_gelu(in_dim, out_dim)

    def forward(self, features: torch.Tensor, grid: Grid) -> torch.Tensor:
        return self.mlp(features)


class Pool3DMLPConfig(ProjectorConfig):
    model_type = "reasonknee3d_projector_pool3d_mlp"
    projector_type: str = "pool3d_mlp"

    pool_kernel: list[int] | tuple[int, ...] = (1, 1, 1)
    """Average-pooling kernel (= stride) over the patch grid (D, H, W)."""

    def __post_init__(self, **kwargs: Any) -> None:
        self.pool_kernel = triple(self.pool_kernel, "projector_config.pool_kernel")
        super().__post_init__(**kwargs)


@register_projector("pool3d_mlp", Pool3DMLPConfig)
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
        return self.mlp(pool_grid(features, grid, self.kernel))


def pool_grid(features: torch.Tensor, grid: Grid, kernel: Grid) -> torch.Tensor:
    """Average ``(B, D*H*W, C)`` grid-order features over non-overlapping ``kernel`` windows -> ``(B, N', C)``.

    The same numbers as ``F.avg_pool3d`` with stride = kernel on a divisible grid, written as a reshape and a mean
    so that it runs in every dtype on every device (CPU has no bfloat16 ``avg_pool3d`` kernel); the mean
    accumulates in float32 and returns the input dtype.
    """
    b, n, c = features.shape
    (d, h, w), (kd, kh, kw) = grid, kernel
    x = features.reshape(b, d // kd, kd, h // kh, kh, w // kw, kw, c)
    pooled = x.mean(dim=(2, 4, 6), dtype=torch.float32).to(features.dtype)  # (B, D', H', W', C)
    return pooled.reshape(b, -1, c)


def build_projector(config: ProjectorConfig, in_dim: int, out_dim: int) -> Projector:
    """The registered projector named by ``config.projector_type``."""
    return PROJECTORS[config.projector_type](config, in_dim, out_dim)
