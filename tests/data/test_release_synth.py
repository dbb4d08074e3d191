"""Integration: the release loader, references, cache and Dataset on a 3-volume synthetic release."""
from __future__ import annotations

import json

import pytest

from reasonknee3d.data.cache import VolumeCache, preprocess_release
from reasonknee3d.data.dataset import VolumeQADataset
from reasonknee3d.data.release import ReleaseLoader, export_references, iter_samples
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.data.transforms import PreprocessConfig


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "release"
    write_synthetic_release(root, n_volumes=3, shape=(16, 32, 32), seed=0)
    return root


def _non_empty_splits(root):
    loader = ReleaseLoader(root)
    return [s for s in ("train", "val", "test") if loader.volumes(s)]


def test_loader_reproduces_synthetic_items(synth_root):
    n = 0
    for split in _non_empty_splits(synth_root):
        items = json.loads((synth_root / "data/generate_data" / f"{split}.json").read_text())
        samples = list(iter_samples(synth_root, split))
        assert len(samples) == len(items)
        for item, s in zip(items, samples):  # one volume per group, items already grouped by volume
            assert (s.question_id, s.box, s.answer, s.prompt) == \
                (item["question_id"], item["box"], item["answer"], item["prompt"])
            n += 1
    assert n == 3 * 69


def test_public_style_items_give_the_same_samples(synth_root, tmp_path):
    """Without question_id and box (like the public release), ids come from finding keys and boxes from
    the masks + subregion mapping: they must equal what the generator wrote."""
    split = _non_empty_splits(synth_root)[0]
    expected = list(iter_samples(synth_root, split))
    path = synth_root / "data/generate_data" / f"{split}.json"
    original = path.read_text()
    try:
        items = json.loads(original)
        for item in items:
            del item["question_id"], item["box"]
        path.write_text(json.dumps(items))
        assert list(iter_samples(synth_root, split)) == expected
    finally:
        path.write_text(original)


def test_references_cache_and_dataset(synth_root, tmp_path):
    split = _non_empty_splits(synth_root)[0]
    result = export_references(synth_root, split, tmp_path / "R.jsonl")
    assert result.ok and result.n_done == len((tmp_path / "R.jsonl").read_text().splitlines())
    cfg = PreprocessConfig(input_shape=(8, 16, 16))
    assert preprocess_release(synth_root, cfg, cache_dir=tmp_path / "cache").ok
    ds = VolumeQADataset(list(iter_samples(synth_root, split)), VolumeCache(tmp_path / "cache", cfg), train=True)
    item = ds[0]
    assert item["volume"].shape == (1, 8, 16, 16) and item["orig_shape"] == (16, 32, 32)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 3
