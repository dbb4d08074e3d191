"""Coordinate tokens for boxes: adding them to a tokenizer and giving their embedding rows a sensible start.

Both model families answer boxes as ``<|box_start|>`` + six ``<|coord_k|>`` tokens + ``<|box_end|>``
(``boxes.box_to_coord_tokens``). The K coordinate tokens are new to a pretrained tokenizer; their rows
start at the mean of the existing rows plus a small ordered component (a slow rotation in a random 2D
plane), so neighbouring bins start out similar and far bins distinguishable.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import nn

from ..constants import COORD_TOKEN_FORMAT

_COORD_TOKEN_RE = re.compile("^" + re.escape(COORD_TOKEN_FORMAT).replace(r"\{\}", r"(\d+)") + "$")

# Size of the ordered component relative to the per-dimension spread of the existing rows.
_ORDERED_SCALE = 0.5
# Noise given to non-coordinate new tokens, relative to the same spread.
_NOISE_SCALE = 0.02


def coord_tokens(num_bins: int) -> list[str]:
    """``<|coord_0|>`` .. ``<|coord_{K-1}|>``."""
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2 to describe a box, got {num_bins}")
    return [COORD_TOKEN_FORMAT.format(k) for k in range(num_bins)]


def add_box_tokens(tokenizer, num_bins: int, extra: Sequence[str] = ()) -> list[int]:
    """Add the K coordinate tokens (and ``extra`` tokens) as special tokens; return their ids in order.

    Idempotent: tokens the tokenizer already has keep their ids.
    """
    tokens = coord_tokens(num_bins) + list(extra)
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unk = [t for t, i in zip(tokens, ids) if i is None or i == tokenizer.unk_token_id]
    if unk:
        raise RuntimeError(f"tokenizer {type(tokenizer).__name__} did not register tokens {unk[:3]}")
    return list(ids)


def coord_token_bins(tokenizer, ids: Sequence[int]) -> dict[int, int]:
    """Map each id in ``ids`` that is a coordinate token to its bin index."""
    out = {}
    for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(list(ids))):
        m = _COORD_TOKEN_RE.match(tok or "")
        if m:
            out[int(i)] = int(m.group(1))
    return out


@torch.no_grad()
def _init_rows(weight: torch.Tensor, new_ids: Sequence[int], bins: dict[int, int], num_bins: int,
               generator: torch.Generator) -> None:
    new = torch.as_tensor(sorted(set(int(i) for i in new_ids)), dtype=torch.long)
    old_mask = torch.ones(weight.shape[0], dtype=torch.bool)
    old_mask[new] = False
    # Rows beyond the tokenizer's old vocabulary (unused padding rows) would bias the mean; the old
    # vocabulary is every row below the first new id.
    old_mask[int(new.min()):] = False
    old = weight[old_mask].float()  # (V_old, C)
    if old.shape[0] == 0:
        raise ValueError("cannot initialise new token rows: the embedding has no existing rows below the new ids")
    mean, std = old.mean(0), old.std(0).clamp_min(1e-6)
    c = weight.shape[1]
    u = torch.randn(c, generator=generator) * std
    v = torch.randn(c, generator=generator) * std
    for i in new.tolist():
        if i in bins:
            # Bin k sits at angle k/(K-1) * pi/2 between u and v: neighbours are close, ends orthogonal.
            a = bins[i] / max(num_bins - 1, 1) * math.pi / 2
            row = mean + _ORDERED_SCALE * (math.cos(a) * u + math.sin(a) * v)
        else:
            row = mean + _NOISE_SCALE * torch.randn(c, generator=generator) * std
        weight[i] = row.to(weight.dtype)


def init_new_embeddings(model_embeddings: nn.Embedding, lm_head: Optional[nn.Linear], new_ids: Sequence[int],
                        tokenizer, seed: int = 0) -> None:
    """Initialise the rows ``new_ids`` of the input embedding (and of an untied ``lm_head``) in place.

    The embedding must already have a row for every id (see ``add_box_tokens_to_model``, which resizes).
    A tied ``lm_head`` (the same weight as the embedding, as in Qwen2.5-VL-3B) is initialised once.
    """
    if not new_ids:
        return
    need = max(new_ids) + 1
    if model_embeddings.weight.shape[0] < need:
        raise ValueError(f"the input embedding has {model_embeddings.weight.shape[0]} rows but token id "
                         f"{need - 1} needs {need}: call model.resize_token_embeddings(len(tokenizer)) first")
    bins = coord_token_bins(tokenizer, new_ids)
    num_bins = max(bins.values()) + 1 if bins else 1
    gen = torch.Generator().manual_seed(seed)
    _init_rows(model_embeddings.weight.data, new_ids, bins, num_bins, gen)
    if lm_head is not None and lm_head.weight.data_ptr() != model_embeddings.weight.data_ptr():
        if lm_head.weight.shape[0] < need:
            raise ValueError(f"lm_head has {lm_head.weight.shape[0]} rows but token id {need - 1} needs {need}")
        _init_rows(lm_head.weight.data, new_ids, bins, num_bins, torch.Generator().manual_seed(seed + 1))


def add_box_tokens_to_model(model, tokenizer, num_bins: int, extra: Sequence[str] = ()) -> list[int]:
    """Add coordinate tokens to ``tokenizer``, grow ``model``'s vocabulary if needed, initialise the rows.

    Only ids the tokenizer did not have before are (re)initialised, so calling it twice changes nothing.
    Returns the ids of all coordinate (+ extra) tokens, in bin order.
    """
    before = len(tokenizer)
    ids = add_box_tokens(tokenizer, num_bins, extra)
    fresh = [i for i in ids if i >= before]
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # mean_resizing=False: our own initialisation below replaces the rows anyway.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    init_new_embeddings(model.get_input_embeddings(), model.get_output_embeddings(), fresh, tokenizer)
    return ids
