"""Grade-balanced sampling: draw rare grades more often, so that greedy decoding targets balanced accuracy.

MOAKS grades are mostly 0 (no lesion), in the real release as in the synthetic one. A model trained on the
natural mix learns p(grade | image), and greedy decoding then writes grade 0 unless the image leaves almost
no doubt. ReasonKnee-Bench's ``balanced_acc`` averages the recall of every grade present, for which the
better decision is the argmax of p(grade | image) / p(grade) (prior-corrected; Menon et al., "Long-tail
learning via logit adjustment", ICLR 2021). Drawing samples with weight ``1 / count(grade)`` trains the model
on the balanced mix, so its own greedy decoding makes that decision. The price is diag_exact, which rewards
writing the majority grade. It only helps as far as the model tells the grades apart: with a model that
cannot, it lowers balanced accuracy (docs/results.md, "Grade-balanced sampling").

Weights (``train.grade_balance`` = power p; 0 = natural mix, 1 = fully balanced):

- within each (category, field key) group, the groups ``balanced_acc`` averages over, grade c of field f
  gets ``(n_f / (k_f * n_fc)) ** p``, with n_f the group's samples, k_f its distinct grades and n_fc the
  samples with grade c: at p = 1 every grade then carries the same total weight;
- a sample's weight is the mean of those over its question's fields;
- weights are rescaled within each category to sum to the category's sample count, so the mix of
  categories (hence of question types) stays the natural one and only the grades within them are rebalanced.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ..data.release import Sample
from ..schema import get_question


def grade_balance_weights(samples: Sequence[Sample], power: float) -> torch.Tensor:
    """Sampling weight of each sample (float64, mean 1 within every category); see the module docstring."""
    if not power >= 0:
        raise ValueError(f"grade balance power must be >= 0, got {power!r}")
    category = [get_question(s.question_id).category for s in samples]
    counts: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for s, cat in zip(samples, category):
        for key, grade in s.severity.items():
            counts[cat, key][grade] += 1
    raw = torch.ones(len(samples), dtype=torch.float64)
    for i, (s, cat) in enumerate(zip(samples, category)):
        if not s.severity:
            continue
        per_field = []
        for key, grade in s.severity.items():
            c = counts[cat, key]
            per_field.append((sum(c.values()) / (len(c) * c[grade])) ** power)
        raw[i] = sum(per_field) / len(per_field)
    out = raw.clone()
    members: dict[str, list[int]] = defaultdict(list)
    for i, cat in enumerate(category):
        members[cat].append(i)
    for idx in members.values():
        ids = torch.tensor(idx)
        out[ids] = raw[ids] * (len(idx) / raw[ids].sum())
    return out


class GradeBalancedSampler(Sampler[int]):
    """``len(weights)`` indices per epoch, drawn with replacement in proportion to ``weights``.

    The generator is seeded from ``seed`` and the epoch, so every process of a multi-process run draws the
    same sequence (accelerate then shards its batches across processes) and a resumed run replays the same
    epochs.
    """

    def __init__(self, weights: torch.Tensor, seed: int) -> None:
        if weights.ndim != 1 or len(weights) == 0 or not bool((weights >= 0).all()) or not weights.sum() > 0:
            raise ValueError(f"need a non-empty 1-D tensor of non-negative weights with a positive sum, "
                             f"got shape {tuple(weights.shape)}")
        self.weights = weights.double()
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.weights)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        yield from torch.multinomial(self.weights, len(self.weights), replacement=True, generator=g).tolist()


class VolumeGroupedSampler(Sampler[int]):
    """Every index once per epoch, questions of the same volume next to each other in groups of up to ``group_size``.

    Each volume's questions are shuffled and cut into groups; the groups are shuffled. Consecutive indices, hence
    the questions within a batch, then often share a volume, which the 3D model encodes once. Seeded from ``seed``
    and the epoch, like ``GradeBalancedSampler``, so every process draws the same order.
    """

    def __init__(self, volume_keys: Sequence[str], group_size: int, seed: int) -> None:
        if group_size < 1 or not len(volume_keys):
            raise ValueError(f"need volume keys and group_size >= 1, got {len(volume_keys)} keys, group_size {group_size}")
        self.members: dict[str, list[int]] = {}
        for i, key in enumerate(volume_keys):
            self.members.setdefault(str(key), []).append(i)
        self.n, self.group_size, self.seed, self.epoch = len(volume_keys), int(group_size), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        groups = []
        for idx in self.members.values():
            order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            groups += [order[k:k + self.group_size] for k in range(0, len(order), self.group_size)]
        for j in torch.randperm(len(groups), generator=g).tolist():
            yield from groups[j]
