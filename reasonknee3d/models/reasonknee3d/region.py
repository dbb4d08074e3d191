"""Region look: what lies inside a box the model has just written, fed back into every token after it.

A lesion often covers a few hundred voxels while one visual token of the whole volume covers thousands,
so after writing ``<|box_start|>`` + six coordinate tokens + ``<|box_end|>`` the model looks again: the
box's part of the input volume is resampled to ``config.region_size`` (``crop_regions``), encoded by the
same volume encoder, pooled and projected (``RegionProjector``), and added to the input embedding of that
``<|box_end|>`` and of every later token of the row (``spread_regions``). The answer writes its box before
the grading steps (``answer.py``), so the reasoning and the grades that follow are conditioned on the look.

Why every later token and not the ``<|box_end|>`` alone: the grade tokens come 20-40 positions after the box,
and a feature at ``<|box_end|>`` alone was not read by them, while the same feature added to every later
token was (teacher-forced grade probe, docs/results.md).

Training sees the reference box (teacher forcing), generation the model's own. With a KV cache, the step
that feeds ``<|box_end|>`` back computes the feature, and ``generate`` carries it to the later steps in
``model_kwargs["region_embeds"]`` (``modeling_reasonknee3d``). Beam search would have to reorder that
state and is not supported (constrained decoding does not support it either).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Tokens of a box: <|box_start|>, six coordinates, <|box_end|>.
_COORDS = 6


def crop_regions(volumes: torch.Tensor, bins: torch.Tensor, num_bins: int, size: Sequence[int]) -> torch.Tensor:
    """``(n, C, S, H, W)`` volumes and ``(n, 6)`` bin boxes ``[s0, s1, h0, h1, w0, w1]`` -> ``(n, C, *size)``.

    A box covers bins ``lo..hi`` of ``num_bins`` per axis, i.e. the fraction ``[lo / K, (hi + 1) / K]`` of that
    axis (``crop_fractions``).
    """
    bins = bins.to(device=volumes.device, dtype=torch.float32)
    return crop_fractions(volumes, bins[:, 0::2] / num_bins, (bins[:, 1::2] + 1) / num_bins, size)


def crop_voxel_boxes(volumes: torch.Tensor, boxes: Sequence[Sequence[int]], size: Sequence[int]) -> torch.Tensor:
    """``(n, C, S, H, W)`` volumes and ``n`` inclusive voxel boxes of their grid -> ``(n, C, *size)``: voxels
    ``lo..hi`` of an axis of length ``m`` are the fraction ``[lo / m, (hi + 1) / m]``, as bins are."""
    shape = torch.tensor(volumes.shape[2:], dtype=torch.float32, device=volumes.device)
    b = torch.as_tensor(boxes, dtype=torch.float32, device=volumes.device).reshape(-1, 6)
    return crop_fractions(volumes, b[:, 0::2] / shape, (b[:, 1::2] + 1) / shape, size)


def crop_fractions(volumes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(n, C, S, H, W)`` volumes and ``(n, 3)`` box corners as fractions of each axis -> ``(n, C, *size)``.

    Each box is sampled at ``size`` cell centres with trilinear interpolation (differentiable in the volume).
    """
    n = volumes.shape[0]
    dev = volumes.device
    axes = []
    for a, m in enumerate(size):
        t = (torch.arange(m, device=dev, dtype=torch.float32) + 0.5) / m
        axes.append(2 * (lo[:, a, None] + t[None] * (hi - lo)[:, a, None]) - 1)  # (n, m) in [-1, 1]
    s, h, w = (ax.shape[1] for ax in axes)
    # grid_sample's last axis is (x, y, z) = (W, H, S).
    grid = torch.stack([axes[2][:, None, None, :].expand(n, s, h, w),
                        axes[1][:, None, :, None].expand(n, s, h, w),
                        axes[0][:, :, None, None].expand(n, s, h, w)], dim=-1)
    return F.grid_sample(volumes.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def box_end_bins(ids: torch.LongTensor, box_end_id: int, bin_of_id: torch.Tensor,
                 context: Optional[torch.LongTensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows, columns (in ``ids``) and ``(n, 6)`` bins of every ``<|box_end|>`` in ``ids`` that closes a box,
    in row-major order.

    ``context`` (B, L_ctx) is the whole sequence when ``ids`` are only its last columns (a cached generation
    step); the six tokens before each ``<|box_end|>`` are read there. ``bin_of_id`` maps a token id to its bin
    (-1 for other tokens); a ``<|box_end|>`` not preceded by six coordinate tokens is left out.
    """
    ctx = ids if context is None else context
    shift = ctx.shape[1] - ids.shape[1]
    rows, cols = (ids == box_end_id).nonzero(as_tuple=True)
    at = cols + shift
    keep = at >= _COORDS
    rows, cols, at = rows[keep], cols[keep], at[keep]
    if rows.numel() == 0:
        return rows, cols, torch.zeros(0, _COORDS, dtype=torch.long, device=ids.device)
    window = at[:, None] - _COORDS + torch.arange(_COORDS, device=ids.device)[None]  # (n, 6)
    bins = bin_of_id.to(ids.device)[ctx[rows[:, None], window]]
    ok = (bins >= 0).all(dim=1)
    return rows[ok], cols[ok], bins[ok]


def spread_regions(rows: torch.Tensor, cols: torch.Tensor, features: torch.Tensor, length: int,
                   carried: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the region look adds to each of ``length`` positions, and the feature in force after them.

    ``rows``, ``cols`` (n,) are the boxes' ``<|box_end|>`` positions in row-major order (``box_end_bins``),
    ``features`` (n, C) their region features, ``carried`` (B, C) the feature each row had before this call
    (zeros for a row without a box yet). Each position gets the feature of the latest box closed at or before
    it in this call, else its row's carried one. Returns ``(added (B, length, C), last (B, C))``.
    """
    batch = carried.shape[0]
    table = torch.cat([carried, features.to(carried.dtype)])  # (B + n, C): rows' carried, then the boxes
    marks = torch.zeros(batch, length, dtype=torch.long, device=carried.device)
    marks[rows, cols] = torch.arange(1, rows.numel() + 1, device=carried.device)
    latest = marks.cummax(dim=1).values  # (B, L): 1 + index of the latest box so far in the row, 0 for none
    own = torch.arange(batch, device=carried.device)[:, None].expand(batch, length)
    index = torch.where(latest > 0, batch + latest - 1, own)
    return table[index], table[index[:, -1]]


class RegionProjector(nn.Module):
    """Encoder features of one region ``(n, P, C_enc)`` -> one language-model embedding ``(n, C_text)``.

    Mean and max over the region's patches (a lesion may fill one patch or many), then Linear-GELU-Linear.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([features.mean(dim=1), features.amax(dim=1)], dim=-1))
