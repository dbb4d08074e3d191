"""Grade-balanced sampling: weights by hand, the sampler's draws, and the trainer drawing with them."""
from __future__ import annotations

import collections
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from toy_family import ToyDataset, ToyFamily, collate, toy_experiment

from reasonknee3d.schema import load_schema
from reasonknee3d.config import ConfigError, TrainConfig
from reasonknee3d.training.sampling import GradeBalancedSampler, grade_balance_weights
from reasonknee3d.training.trainer import run_training


def _question(category: str, n_fields: int):
    return next(q for q in load_schema().values() if q.category == category and len(q.fields) == n_fields)


def _sample(spec, grades: list[int]) -> SimpleNamespace:
    return SimpleNamespace(question_id=spec.question_id, severity=dict(zip(spec.field_keys, grades)))


def test_weights_by_hand() -> None:
    one = _question("osteophyte", 1)
    two = _question("meniscal_cyst", 2)
    # osteophyte: 3 x grade 0, 1 x grade 2 -> n=4, k=2: grade 0 weighs 4/(2*3), grade 2 weighs 4/(2*1).
    # meniscal cyst field A: 0, 0, 1 (n=3, k=2): 3/4, 3/4, 3/2; field B: 0, 0, 0 (k=1): 1, 1, 1.
    samples = [_sample(one, [0]), _sample(one, [0]), _sample(one, [0]), _sample(one, [2]),
               _sample(two, [0, 0]), _sample(two, [0, 0]), _sample(two, [1, 0])]
    w = grade_balance_weights(samples, 1.0)
    osteo = torch.tensor([2 / 3, 2 / 3, 2 / 3, 2.0], dtype=torch.float64)
    cyst = torch.tensor([(0.75 + 1) / 2, (0.75 + 1) / 2, (1.5 + 1) / 2], dtype=torch.float64)
    torch.testing.assert_close(w[:4], osteo * 4 / osteo.sum())
    torch.testing.assert_close(w[4:], cyst * 3 / cyst.sum())
    # At p = 1 both osteophyte grades carry the same total weight; each category keeps its sample count.
    assert w[:3].sum() == pytest.approx(w[3].item())
    assert w[:4].sum() == pytest.approx(4) and w[4:].sum() == pytest.approx(3)
    # Power 0 is the natural mix, 0.5 lies between.
    torch.testing.assert_close(grade_balance_weights(samples, 0.0), torch.ones(7, dtype=torch.float64))
    half = grade_balance_weights(samples, 0.5)
    assert 1 < half[3] < w[3]


def test_weights_reject_a_negative_power() -> None:
    with pytest.raises(ValueError, match="power must be >= 0, got -1"):
        grade_balance_weights([], -1)


def test_sampler_draws_in_proportion_and_reseeds_per_epoch() -> None:
    weights = torch.tensor([1.0, 1.0, 6.0, 0.0])
    sampler = GradeBalancedSampler(weights, seed=3)
    assert len(sampler) == 4
    draws = collections.Counter()
    for epoch in range(500):
        sampler.set_epoch(epoch)
        draws.update(list(sampler))
    assert draws[3] == 0
    assert draws[2] / 2000 == pytest.approx(0.75, abs=0.03)
    a, b = GradeBalancedSampler(torch.ones(50), seed=3), GradeBalancedSampler(torch.ones(50), seed=3)
    a.set_epoch(7)
    b.set_epoch(7)
    assert list(a) == list(b)  # same seed and epoch, the same draws: every process agrees
    b.set_epoch(8)
    assert list(a) != list(b)
    with pytest.raises(ValueError, match="positive sum"):
        GradeBalancedSampler(torch.zeros(3), seed=0)


@pytest.mark.parametrize("train, message", [
    (dict(grade_balance=-0.5), "train.grade_balance: expected a power >= 0"),
    (dict(grade_balance=True), "train.grade_balance: expected a power >= 0"),
    (dict(grade_balance=1.0, group_by_length=True), "set one of them"),
])
def test_grade_balance_settings_are_checked(train: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**train)


class _CountingDataset(ToyDataset):
    """Toy items with data-layer-like samples: one abnormal osteophyte among normal ones; counts reads."""

    def __init__(self, n: int, abnormal: int) -> None:
        super().__init__(n)
        spec = _question("osteophyte", 1)
        self.samples = [_sample(spec, [2 if i == abnormal else 0]) for i in range(n)]
        self.reads: collections.Counter = collections.Counter()

    def __getitem__(self, i: int):
        self.reads[i] += 1
        return super().__getitem__(i)


class _CountingFamily(ToyFamily):
    def __init__(self) -> None:
        super().__init__()
        self.dataset = _CountingDataset(24, abnormal=5)

    def train_data(self, exp, model, processor):
        return self.dataset, collate


@pytest.mark.parametrize("power, low, high", [(0.0, 0, 6), (1.0, 30, 50)])
def test_trainer_draws_the_rare_grade_as_often_as_the_rest(tmp_path: Path, power: float, low: int,
                                                           high: int) -> None:
    # 40 steps x 2 = 80 draws (the loader reads one batch ahead). Natural mix: the abnormal item once per
    # 24-item epoch (3-4 times). Fully balanced: half the draws (about 40).
    family = _CountingFamily()
    run_training(toy_experiment(tmp_path / "run", max_steps=40, save_steps=100, grade_balance=power),
                 family=family)
    assert 80 <= sum(family.dataset.reads.values()) <= 84
    assert low <= family.dataset.reads[5] <= high


def test_volume_grouped_sampler_keeps_every_index_and_groups_volumes():
    from reasonknee3d.training.sampling import VolumeGroupedSampler
    keys = [f"v{i % 3}" for i in range(14)]  # v0: 5 questions, v1: 5, v2: 4
    sampler = VolumeGroupedSampler(keys, group_size=2, seed=1)
    order = list(sampler)
    assert sorted(order) == list(range(14))
    # Groups of up to 2 of one volume: 3 + 3 + 2 = 8 groups, so at most 7 volume changes along the order.
    changes = sum(keys[a] != keys[b] for a, b in zip(order, order[1:]))
    assert changes <= 7
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(sampler) == list(range(14))


def test_group_volumes_merges_only_identical_inputs():
    from reasonknee3d.families.threed import group_volumes
    a, b = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    batch = {"input_ids": torch.zeros(4, 2, dtype=torch.long), "volumes": torch.stack([a, b, a, b + 1e-3])}
    out = group_volumes(batch)
    assert out["volume_index"].tolist() == [0, 1, 0, 2]
    assert torch.equal(out["volumes"][out["volume_index"]], batch["volumes"])
    assert group_volumes({"volumes": torch.stack([a, b])}).keys() == {"volumes"}
