"""Trainable rows of added tokens (peft ``trainable_token_indices``) without copying the embedding matrix.

Imported where peft wraps a model (``training.stages``) or loads an adapter (``models.precision``), not by
``tokens``, so that importing the model packages does not import peft.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn


class GatheredTrainableTokensLayer(TrainableTokensLayer):
    """peft's trainable token rows (``trainable_token_indices``) that never copy the embedding matrix.

    peft's layer builds ``W.index_copy(rows, delta)``, a full copy of the (vocab x hidden) matrix, on every forward
    (about 622 MB for Qwen2.5-VL-3B in bf16, at every decoding step), and differentiates through it. This one
    looks the ids up in the frozen matrix and replaces the positions of added tokens with their trainable rows
    (embedding), or computes the added tokens' logits apart and writes them into their columns (a tied or untied
    ``lm_head``). Same outputs and the same gradients for the trainable rows; the state (``trainable_tokens_delta``,
    saved keys, merging) is peft's, so adapters save and load as before. Rows are cast to the output dtype, so
    they can be kept in float32 under a bfloat16 model.
    """

    def _rows(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sorted token ids, their slot in ``trainable_tokens_delta``, the delta) of ``adapter``."""
        delta = self.trainable_tokens_delta[adapter]
        ids = torch.as_tensor(self.token_indices[adapter], dtype=torch.long, device=delta.device)
        ids, slots = ids.sort()
        return ids, slots, delta

    def forward_adapters(self, x: torch.Tensor, active_adapters: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or not active_adapters or self.merged:
            return super().forward_adapters(x, active_adapters, *args, **kwargs)
        self._check_overlapping_tokens(active_adapters)
        base = self.base_layer
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, base.weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                              norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
            for adapter in active_adapters:
                ids, slots, delta = self._rows(adapter)
                pos = torch.searchsorted(ids, x).clamp_max(ids.numel() - 1)
                hit = ids[pos] == x
                rows = delta[slots[pos]].to(out.dtype)  # (..., C): only the looked-up rows, never the matrix
                out = torch.where(hit.unsqueeze(-1), rows, out)
            scale = self._get_embed_scale()
            return out if scale is None else out * scale.to(out.dtype)
        if isinstance(base, nn.Linear):
            out = F.linear(x, base.weight)  # peft's tied-head path also leaves out any bias
            for adapter in active_adapters:
                ids, slots, delta = self._rows(adapter)
                new = F.linear(x, delta[slots].to(x.dtype))  # (..., n) logits of the added tokens
                out = out.index_copy(-1, ids, new.to(out.dtype))
            return out
        return super().forward_adapters(x, active_adapters, *args, **kwargs)


def gather_token_rows(model: nn.Module) -> int:
    """Switch every peft trainable-token layer in ``model`` to ``GatheredTrainableTokensLayer`` (in place; same
    parameters and state dict). Returns how many layers were switched."""
    n = 0
    for module in model.modules():
        if type(module) is TrainableTokensLayer:
            module.__class__ = GatheredTrainableTokensLayer
            n += 1
    return n
