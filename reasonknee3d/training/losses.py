"""Training losses: logits only where there are labels, and ordinal coordinate targets.

``answer_logits_only(batch)`` makes a training batch compute logits from the column before its first label
to the end: the prompt and the media tokens carry no loss, yet their logits ``(B, L, vocab)`` (float32
inside the loss) are most of a step's activation memory when a volume is thousands of tokens (the slice
baseline: 5,120 per volume, vocabulary 151k). The loss is the same to rounding (tests/training).

``CoordinateSmoothedLoss``, for ``Trainer(compute_loss_func=...)``:

Coordinate tokens ``<|coord_0|> .. <|coord_{K-1}|>`` are ordered: predicting bin 31 for a true 30 is nearly
right, bin 0 is far off, yet plain cross-entropy scores both as equally wrong. With ``sigma > 0`` the target
of a coordinate position is a discretised Gaussian over the K bins centred on the true bin (the rest of the
vocabulary gets 0), so near misses cost less and the gradient points towards the right neighbourhood from
the first steps. Every other token keeps the usual one-hot cross-entropy. ``sigma = 0`` is exactly the
models' own causal-LM loss.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX


def takes_logits_to_keep(model: Any) -> bool:
    """Whether ``model`` (possibly a peft wrapper) names ``logits_to_keep`` in its ``forward``, as transformers'
    causal LMs and ours do. Models without it get full logits from ``answer_logits_only``'s callers."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def answer_logits_only(batch: dict[str, Any]) -> dict[str, Any]:
    """``batch`` with ``logits_to_keep`` = the columns from the one before the first label to the end and
    ``labels`` cut to those columns (the loss shifts labels by one, so that first kept logit predicts the
    first label). Unchanged when it has no labels, already sets ``logits_to_keep``, or nothing can be cut.
    """
    labels = batch.get("labels")
    if not torch.is_tensor(labels) or "logits_to_keep" in batch:
        return batch
    columns = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(columns) == 0:
        return batch
    keep = labels.shape[1] - max(int(columns[0]) - 1, 0)
    if keep >= labels.shape[1]:
        return batch
    return {**batch, "labels": labels[:, -keep:], "logits_to_keep": keep}


def gaussian_bin_targets(num_bins: int, sigma: float) -> torch.Tensor:
    """``(K, K)``: row k is the target distribution over bins when the true bin is k (rows sum to 1)."""
    if sigma <= 0:
        return torch.eye(num_bins)
    k = torch.arange(num_bins, dtype=torch.float64)
    return torch.softmax(-((k[:, None] - k[None, :]) ** 2) / (2.0 * sigma ** 2), dim=-1).float()


class CoordinateSmoothedLoss:
    """Causal-LM loss (labels shifted by one inside) with Gaussian-smoothed coordinate-token targets.

    ``coord_token_ids`` are the coordinate tokens' ids in bin order. Called as
    ``loss(outputs, labels, num_items_in_batch)``: the sum over labelled tokens divided by
    ``num_items_in_batch`` (Trainer's count over the whole accumulated batch) or by this batch's count.
    A class rather than a closure so it pickles into DataLoader workers and spawn-started processes.
    """

    def __init__(self, coord_token_ids: Sequence[int], sigma: float) -> None:
        if not coord_token_ids:
            raise ValueError("CoordinateSmoothedLoss needs the coordinate token ids (the model has none)")
        if sigma < 0:
            raise ValueError(f"coordinate label sigma must be >= 0 bins, got {sigma}")
        self.ids = torch.as_tensor(list(coord_token_ids), dtype=torch.long)
        self.sigma = float(sigma)
        self.targets = gaussian_bin_targets(len(self.ids), self.sigma)

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Optional[Any] = None) -> torch.Tensor:
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        vocab = logits.shape[-1]
        flat_logits = logits[:, :-1].reshape(-1, vocab).float()
        target = labels[:, 1:].reshape(-1).to(flat_logits.device)
        per_token = F.cross_entropy(flat_logits, target, ignore_index=IGNORE_INDEX, reduction="none")
        ids = self.ids.to(target.device)
        coord = torch.isin(target, ids)
        if self.sigma > 0 and bool(coord.any()):
            # bin of each coordinate target: its index in the bin-ordered id list
            bins = (target[coord].unsqueeze(1) == ids.unsqueeze(0)).float().argmax(1)
            log_p = torch.log_softmax(flat_logits[coord], dim=-1)[:, ids]  # (n, K)
            soft = -(self.targets.to(log_p.device)[bins] * log_p).sum(-1)
            per_token = per_token.masked_scatter(coord, soft)
        n = (target != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
        if torch.is_tensor(n):
            n = n.to(per_token.device)
        return per_token.sum() / n
