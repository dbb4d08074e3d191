"""VolumeQADataset: reads only the cache, shares one file per volume, scales and augments boxes."""
from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import torch

from reasonknee3d.boxes import scale_boxes
from reasonknee3d.data.cache import CacheMiss, VolumeCache, preprocess_release
from reasonknee3d.data.dataset import VolumeQADataset
from reasonknee3d.data.release import iter_samples
from reasonknee3d.data.transforms import PreprocessConfig


@pytest.fixture
def cached(release, tmp_path):
    cfg = PreprocessConfig(input_shape=(4, 6, 5), augment_prob=1.0, zoom_range=(1.2, 1.3))
    assert preprocess_release(release.root, cfg, cache_dir=tmp_path / "c").ok
    return VolumeCache(tmp_path / "c", cfg), list(iter_samples(release.root, "test"))


def _no_nifti(*args, **kwargs):
    raise AssertionError("the dataset opened a NIfTI file")


def test_items_read_only_the_cache(cached, monkeypatch):
    cache, samples = cached
    monkeypatch.setattr(nib, "load", _no_nifti)
    ds = VolumeQADataset(samples, cache)
    assert len(ds) == 6
    item = ds[0]
    s = samples[0]
    # float16 as cached: the model's patch embedding casts it on its device
    assert item["volume"].shape == (1, 4, 6, 5) and item["volume"].dtype == torch.float16
    assert (item["prompt"], item["answer"], item["question_id"], item["sample_id"]) == \
        (s.prompt, s.answer, s.question_id, s.sample_id)
    assert item["orig_shape"] == (8, 12, 10)
    assert item["box"] == scale_boxes(s.box, (8, 12, 10), (4, 6, 5)).tolist()
    assert ds[2]["box"] is None  # question 42 has no region


def test_samples_of_one_volume_share_one_cached_file(cached):
    cache, samples = cached
    by_volume = {}
    for s in samples:
        by_volume.setdefault(s.volume_id, set()).add(cache.paths(s.image_path)[0])
    assert all(len(paths) == 1 for paths in by_volume.values()) and len(by_volume) == 2
    ds = VolumeQADataset(samples, cache)
    torch.testing.assert_close(ds[0]["volume"], ds[1]["volume"])  # same volume, two questions


def test_train_mode_moves_box_and_answer_together(cached):
    cache, samples = cached
    ds = VolumeQADataset(samples, cache, train=True)
    torch.manual_seed(0)
    item = ds[0]
    s = samples[0]
    assert item["box"] != scale_boxes(s.box, (8, 12, 10), (4, 6, 5)).tolist()  # zoom 1.2-1.3 always moves it
    m = re.search(r"<\|box_start\|>\[([^\]]*)\]<\|box_end\|>", item["answer"])
    assert m is not None
    assert [int(v) for v in m.group(1).split(",")] == scale_boxes(item["box"], (4, 6, 5), (8, 12, 10)).tolist()
    assert item["answer"].replace(m.group(0), "") == re.sub(r"<\|box_start\|>.*<\|box_end\|>", "", s.answer)


def test_missing_cache_entry_is_a_clear_error(release, tmp_path):
    cache = VolumeCache(tmp_path / "empty", PreprocessConfig(input_shape=(4, 6, 5)))
    ds = VolumeQADataset(list(iter_samples(release.root, "test")), cache)
    with pytest.raises(CacheMiss, match="run `reasonknee3d preprocess` first"):
        ds[0]


def test_workers_get_different_augmentations(cached):
    cache, samples = cached
    ds = VolumeQADataset(samples[:1] * 4, cache, train=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    vols = [item["volume"] for item in loader]
    # Worker 0 serves items 0 and 2, worker 1 items 1 and 3: equal copies of one RandomState would repeat.
    assert not torch.allclose(vols[0], vols[1])
    assert np.isfinite(torch.stack(vols).numpy()).all()


def test_canonical_side_mirrors_volume_box_and_answer_of_the_other_knee(release, tmp_path):
    from reasonknee3d.boxes import mirror_boxes, mirror_text_boxes
    items = {}
    for side in (None, "right"):
        cfg = PreprocessConfig(input_shape=(4, 6, 5), canonical_side=side)
        assert preprocess_release(release.root, cfg, cache_dir=tmp_path / str(side)).ok
        samples = list(iter_samples(release.root, "test"))
        items[side] = (samples, VolumeQADataset(samples, VolumeCache(tmp_path / str(side), cfg)))
    samples, plain = items[None]
    _, canon = items["right"]
    for i, s in enumerate(samples):
        a, b = plain[i], canon[i]
        assert b["mirrored"] == (s.knee_side == "left") and not a["mirrored"]
        if not b["mirrored"]:
            assert torch.equal(a["volume"], b["volume"]) and a["answer"] == b["answer"] and a["box"] == b["box"]
            continue
        assert torch.equal(b["volume"], a["volume"].flip(1))
        if s.box is not None:
            assert b["box"] == mirror_boxes(a["box"], (4, 6, 5)).tolist()
            assert b["answer"] == mirror_text_boxes(a["answer"], (8, 12, 10)) != a["answer"]
    assert any(s.knee_side == "left" and s.box is not None for s in samples)
