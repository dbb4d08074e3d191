"""VolumeAugment: one augmentation draw per distinct volume of a batch (train.volume_grouping > 1)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from reasonknee3d.boxes import scale_boxes
from reasonknee3d.data.cache import VolumeCache, preprocess_release
from reasonknee3d.data.dataset import VolumeQADataset
from reasonknee3d.data.release import iter_samples
from reasonknee3d.data.transforms import PreprocessConfig, build_train_augment

BOX_TEXT = re.compile(r"<\|box_start\|>\[([^\]]*)\]<\|box_end\|>")
INPUT = (8, 12, 10)  # the tiny release's loaded shape: boxes keep their voxels before the zoom


@pytest.fixture
def grouped(release_factory, tmp_path):
    """Datasets over a release of 2 volumes x 4 questions (question 42 has no box), per volume and per item."""
    rel = release_factory(questions=(1, 16, 30, 42))
    cfg = PreprocessConfig(input_shape=INPUT, augment_prob=1.0, zoom_range=(1.2, 1.3))
    assert preprocess_release(rel.root, cfg, cache_dir=tmp_path / "c").ok
    samples = list(iter_samples(rel.root, "test"))
    cache = VolumeCache(tmp_path / "c", cfg)
    return cfg, samples, VolumeQADataset(samples, cache, train=True, augment_per_volume=True)


def test_per_volume_items_come_unaugmented_and_the_per_item_path_is_unchanged(grouped):
    cfg, samples, ds = grouped
    assert ds.augment is None and ds.volume_augment is not None
    item = ds[0]
    assert item["volume"].dtype == torch.float16  # the cached array, untouched
    assert item["box"] == list(samples[0].box) and item["answer"] == samples[0].answer
    assert item["image_path"] == str(samples[0].image_path)

    per_item = VolumeQADataset(samples, ds.cache, train=True)  # volume_grouping 1: as before
    assert per_item.volume_augment is None and per_item.augment is not None
    torch.manual_seed(3)
    got = per_item[0]
    ref = build_train_augment(cfg)
    ref.set_random_state(seed=3)
    want = ref({"image": item["volume"].float(), "box": list(samples[0].box)})
    assert torch.equal(got["volume"], torch.as_tensor(want["image"]).as_subclass(torch.Tensor).float())
    assert got["box"] == want["box"] != list(samples[0].box)


def test_one_draw_per_volume_moves_every_box_of_it(grouped):
    cfg, samples, ds = grouped
    rows = [i for i, s in enumerate(samples) if s.volume_id == samples[0].volume_id]
    assert len(rows) == 4
    items = [ds[i] for i in rows]
    torch.manual_seed(7)
    out, index = ds.volume_augment(items)
    assert index == [0, 0, 0, 0]
    assert all(o["volume"] is out[0]["volume"] for o in out)  # one tensor: the batch holds the volume once

    for it, o in zip(items, out):
        # The same draw applied to this row's box alone (build_train_augment seeded alike) moves it the same way
        # and gives the same image.
        ref = build_train_augment(cfg)
        ref.set_random_state(seed=7)
        want = ref({"image": it["volume"].float(), "box": it["box"]})
        torch.testing.assert_close(o["volume"], torch.as_tensor(want["image"]).as_subclass(torch.Tensor).float(),
                                   rtol=0, atol=0)
        assert o["box"] == want["box"]
        if it["box"] is None:
            assert o["answer"] == it["answer"] and not BOX_TEXT.search(o["answer"])
            continue
        assert o["box"] != it["box"]  # zoom 1.2-1.3 moves every box
        m = BOX_TEXT.search(o["answer"])
        assert [int(v) for v in m.group(1).split(",")] == scale_boxes(o["box"], INPUT, it["orig_shape"]).tolist()
        assert o["answer"].replace(m.group(0), "") == BOX_TEXT.sub("", it["answer"])
        assert it["answer"] != o["answer"]
    assert sum(it["box"] is None for it in items) == 1


def test_two_volumes_get_two_draws_and_runs_repeat_for_a_seed(grouped):
    _, samples, ds = grouped
    items = [ds[i] for i in range(len(samples))]
    keys = [str(s.image_path) for s in samples]
    torch.manual_seed(11)
    out, index = ds.volume_augment(items)
    first = {k: index[keys.index(k)] for k in keys}
    assert index == [first[k] for k in keys] and sorted(set(index)) == [0, 1]
    a, b = (out[keys.index(k)]["volume"] for k in dict.fromkeys(keys))
    assert not torch.equal(a, b)

    torch.manual_seed(12)  # another seed, another draw
    other, _ = ds.volume_augment(items)
    assert not torch.equal(other[0]["volume"], out[0]["volume"])
    torch.manual_seed(11)  # the same seed, the same draw
    again, _ = ds.volume_augment(items)
    assert all(torch.equal(x["volume"], y["volume"]) and x["answer"] == y["answer"] for x, y in zip(out, again))


def test_collate_in_workers_draws_differently_per_worker(grouped):
    _, samples, ds = grouped
    rows = [i for i, s in enumerate(samples) if s.volume_id == samples[0].volume_id]

    def collate(items):
        out, index = ds.volume_augment(items)
        return out[0]["volume"], index

    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, rows * 2), batch_size=4, num_workers=2,
                                         collate_fn=collate)
    (v0, i0), (v1, i1) = list(loader)
    # Worker 0 collates batch 0, worker 1 batch 1: copies of one RandomState would draw the same zoom.
    assert i0 == i1 == [0, 0, 0, 0] and not torch.allclose(v0, v1)
    assert np.isfinite(torch.stack([v0, v1]).numpy()).all()
