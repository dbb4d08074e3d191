"""Vision-feature cache of the slice baseline: keys, misses, and `preprocess` over a synthetic release."""
from __future__ import annotations

import os

import pytest
import torch

from reasonknee3d.data.cache import CacheMiss
from reasonknee3d.data.io import load_volume
from reasonknee3d.data.release import ReleaseLoader
from reasonknee3d.models.slice import configuration_slice, features, modeling_slice, processing_slice
from reasonknee3d.models.tiny_qwen import default_tiny_qwen_dir


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from reasonknee3d.data.synth import write_synthetic_release
    root = tmp_path_factory.mktemp("release")
    write_synthetic_release(root, n_volumes=3, shape=(16, 32, 32), seed=0, questions=[1], overwrite=True)
    return root


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    tiny = default_tiny_qwen_dir(tmp_path_factory.getbasetemp())
    return configuration_slice.SliceBaselineConfig(language_model={"path": str(tiny)}, num_bins=16, num_frames=4, frame_size=(56, 56),
                                  window_mode="percentile", window=(1, 99))


def test_preprocess_fills_the_cache_once(release, cfg, tmp_path, monkeypatch):
    cache_dir = tmp_path / "feats"
    res = modeling_slice.preprocess_slice_features(release, {"family": "slice", "model": cfg.to_dict()}, cache_dir)
    volumes = [v for s in ("train", "val", "test") for v in ReleaseLoader(release).volumes(s)]
    assert res.ok and res.n_done == len(volumes) == len(list(cache_dir.glob("*.safetensors")))
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # atomic writes left no temp files

    calls = []
    real = features.compute_video_features
    monkeypatch.setattr(modeling_slice, "compute_video_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = modeling_slice.preprocess_slice_features(release, cfg, cache_dir)
    assert again.n_done == len(volumes) and calls == []  # every volume a cache hit

    model, processor = modeling_slice.build_slice_model(cfg)
    cache = features.SliceFeatureCache.for_model(cache_dir, model.eval(), cfg)
    vol = volumes[0]
    entry = cache.load(vol.image_path)
    volume, meta = load_volume(vol.image_path)
    feats, grid = real(model, processor, cfg, processing_slice.volume_to_frames(volume, cfg))
    assert torch.allclose(entry.features, feats, atol=1e-6) and torch.equal(entry.grid_thw, grid)
    assert entry.volume_shape == meta.shape == (16, 32, 32)
    assert entry.features.shape[0] == processing_slice.token_count(cfg, meta.shape)


def test_key_tracks_settings_source_and_vision_weights(release, cfg, tmp_path):
    model, _ = modeling_slice.build_slice_model(cfg)
    image = ReleaseLoader(release).volumes("train")[0].image_path
    cache = features.SliceFeatureCache.for_model(tmp_path, model, cfg)
    key = cache.key(image)
    # Settings that only affect the language side (bins, fps, prompts) keep the key ...
    same = configuration_slice.SliceBaselineConfig(**{**cfg.to_dict(), "num_bins": 32, "fps": 1.0, "system_prompt": "hi"})
    assert features.SliceFeatureCache(tmp_path, cache.vision_id, same).key(image) == key
    # ... frame settings, the source file and the vision weights change it.
    other = configuration_slice.SliceBaselineConfig(**{**cfg.to_dict(), "num_frames": 6})
    assert features.SliceFeatureCache(tmp_path, cache.vision_id, other).key(image) != key
    assert features.SliceFeatureCache(tmp_path, "other-tower", cfg).key(image) != key
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache.key(image) != key
    with pytest.raises(CacheMiss, match="reasonknee3d preprocess"):
        cache.load(image)
    with pytest.raises(CacheMiss, match="not found"):
        cache.key(tmp_path / "missing.nii.gz")


def test_fingerprint_is_shared_by_base_and_slice_model(cfg, tmp_path):
    """A slice model made from a base checkpoint reuses the base's cache entries (same vision weights)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, _ = modeling_slice.build_slice_model(cfg)  # box tokens added: language side differs from the base
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(cfg.language_model["path"])
    assert features.vision_fingerprint(model) == features.vision_fingerprint(base)
    with torch.no_grad():
        base.model.visual.merger.mlp[0].weight.add_(1e-3)
    base._reasonknee3d_vision_fp = None
    assert features.vision_fingerprint(base) != features.vision_fingerprint(model)


def test_cached_batches_through_a_dataloader(release, cfg, tmp_path):
    """The trainer's loop: samples -> DataLoader(collate_fn=SliceCollator) -> model(**batch) on cached features."""
    from reasonknee3d.data.release import iter_samples

    model, processor = modeling_slice.build_slice_model(cfg)
    samples = list(iter_samples(release, "train"))
    cache = features.SliceFeatureCache.for_model(tmp_path, model, cfg)
    modeling_slice.preprocess_slice_features(release, cfg, tmp_path, splits=["train"])
    loader = torch.utils.data.DataLoader(samples, batch_size=2, collate_fn=processing_slice.SliceCollator(processor, cfg, cache))
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == 2 and torch.isfinite(model(**batch).loss)


def test_cached_batches_survive_pinned_memory(release, cfg, tmp_path, monkeypatch):
    """On CUDA the Trainer's DataLoader pins every batch (torch.utils.data's pin_memory); a plain ModelOutput in
    the batch made that raise ("You cannot use ``update``"), which only a GPU run showed. Pinning is simulated
    here (Tensor.pin_memory needs a CUDA build) by a clone that records each pinned tensor."""
    import pickle

    from torch.utils.data._utils.pin_memory import pin_memory
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from reasonknee3d.data.release import iter_samples

    model, processor = modeling_slice.build_slice_model(cfg)
    cache = features.SliceFeatureCache.for_model(tmp_path, model, cfg)
    modeling_slice.preprocess_slice_features(release, cfg, tmp_path, splits=["train"])
    batch = processing_slice.SliceCollator(processor, cfg, cache)(list(iter_samples(release, "train"))[:2])
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())

    out = pin_memory(batch)
    video = out["mm_encoder_outputs"]["video"]
    assert type(video) is processing_slice.CachedVideoOutput
    sent = batch["mm_encoder_outputs"]["video"].pooler_output
    assert len(video.pooler_output) == len(sent) == 2
    assert all(torch.equal(a, b) and a is not b for a, b in zip(video.pooler_output, sent))
    assert any(t is sent[0] for t in pinned)  # the features were pinned, not passed through
    assert torch.isfinite(model(**out).loss)
    # DataLoader workers send batches back pickled.
    assert type(pickle.loads(pickle.dumps(video))) is processing_slice.CachedVideoOutput
    with pytest.raises(Exception, match="update"):  # what the batch held before
        pin_memory({"video": BaseModelOutputWithPooling(pooler_output=sent)})
