"""Coordinate-smoothed loss: equals the models' own loss at sigma 0, hand-checked soft targets otherwise."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from reasonknee3d.constants import IGNORE_INDEX
from reasonknee3d.training.losses import CoordinateSmoothedLoss, gaussian_bin_targets, takes_logits_to_keep

COORD = [10, 11, 12, 13]  # ids of bins 0..3 in a vocabulary of 16


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, 3, 12, 10, IGNORE_INDEX], [IGNORE_INDEX, IGNORE_INDEX, 13, 5, 2]])
    return logits, labels


def test_sigma_zero_is_plain_shifted_cross_entropy():
    logits, labels = _batch()
    loss = CoordinateSmoothedLoss(COORD, 0.0)(SimpleNamespace(logits=logits), labels)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 16), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, ref)
    # num_items_in_batch (Trainer's count over accumulated batches) divides the sum instead
    half = CoordinateSmoothedLoss(COORD, 0.0)(SimpleNamespace(logits=logits), labels, num_items_in_batch=12)
    torch.testing.assert_close(half, ref * 6 / 12)


def test_coordinate_targets_are_a_gaussian_over_bins_by_hand():
    t = gaussian_bin_targets(4, 1.0)
    w = [math.exp(-d * d / 2) for d in (1, 0, 1, 2)]  # true bin 1: distances 1, 0, 1, 2
    torch.testing.assert_close(t[1], torch.tensor([x / sum(w) for x in w]))
    assert torch.equal(gaussian_bin_targets(4, 0.0), torch.eye(4))


def test_smoothed_loss_replaces_only_coordinate_positions():
    logits, labels = _batch()
    sigma = 1.0
    loss = CoordinateSmoothedLoss(COORD, sigma)(SimpleNamespace(logits=logits), labels)
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    t = gaussian_bin_targets(4, sigma)
    # labelled (shifted) positions: row 0 -> 3, 12(bin 2), 10(bin 0); row 1 -> 13(bin 3), 5, 2
    terms = [-lp[0, 0, 3], -(t[2] * lp[0, 1, COORD]).sum(), -(t[0] * lp[0, 2, COORD]).sum(),
             -(t[3] * lp[1, 1, COORD]).sum(), -lp[1, 2, 5], -lp[1, 3, 2]]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_near_misses_cost_less_than_far_ones():
    labels = torch.tensor([[IGNORE_INDEX, 11]])  # true bin 1
    def loss_for(bin_):
        logits = torch.full((1, 2, 16), -5.0)
        logits[0, 0, COORD[bin_]] = 5.0
        return CoordinateSmoothedLoss(COORD, 1.0)(SimpleNamespace(logits=logits), labels).item()
    assert loss_for(1) < loss_for(2) < loss_for(3)


@pytest.mark.parametrize("ids,sigma", [([], 1.0), (COORD, -1.0)])
def test_bad_settings_are_refused(ids, sigma):
    with pytest.raises(ValueError):
        CoordinateSmoothedLoss(ids, sigma)


def test_models_without_logits_to_keep_are_not_cut():
    # A researcher's model whose forward has no logits_to_keep gets full logits (the trainer checks first).
    class Plain(torch.nn.Module):
        def forward(self, input_ids, labels=None, **kwargs):
            return input_ids

    class Cuts(Plain):
        def forward(self, input_ids, labels=None, logits_to_keep=0, **kwargs):
            return input_ids

    assert not takes_logits_to_keep(Plain()) and takes_logits_to_keep(Cuts())
