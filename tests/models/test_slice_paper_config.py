"""The paper's slice fine-tuning config and the feature resampling it needs (``model.feature_tokens``)."""
from __future__ import annotations


import numpy as np
import pytest
import torch
import yaml

from reasonknee3d.cli import main
from reasonknee3d.data.io import load_volume
from reasonknee3d.families import load_experiment_config, resolve_config
from reasonknee3d.models.slice.configuration_slice import SliceBaselineConfig
from reasonknee3d.models.slice.features import CachedFeatures, SliceFeatureCache, compute_video_features
from reasonknee3d.models.slice.modeling_slice import build_slice_model, load_slice_model, slice_config_of
from reasonknee3d.models.slice.processing_slice import SliceCollator, token_count, volume_to_frames, window_to_uint8
from reasonknee3d.models.tiny_qwen import default_tiny_qwen_dir

PAPER = resolve_config("slice_paper_qwen2.5vl_3b")


def test_paper_config_validates_with_the_published_settings():
    cfg = load_experiment_config(PAPER, [])
    t = cfg.train
    assert (t.split, t.learning_rate, t.num_epochs, t.per_device_batch_size, t.gradient_accumulation_steps) == (
        "train_balanced", 1e-5, 2, 2, 8)
    assert (t.lora.r, t.lora.alpha) == (16, 32) and t.language_model == "lora" and t.encoder == "frozen"
    assert sorted(t.lora.targets) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"])
    model = cfg.model
    assert model.num_frames is None and model.fps == 4.0 and model.feature_tokens == 8192
    assert token_count(model, (160, 384, 384)) == 8192
    # Before resampling: 160 slices at 392 px = 80 temporal patches of 14 x 14 merged tokens.
    assert token_count(SliceBaselineConfig.from_dict({**model.to_dict(), "feature_tokens": None}), (160, 384, 384)) == 15680
    assert model.window_mode == "slice_minmax" and model.window == (0, 400)
    with pytest.raises(ValueError, match="feature_tokens"):
        SliceBaselineConfig.from_dict({**model.to_dict(), "feature_tokens": 0})


def test_paper_config_inits_with_a_tiny_language_model(tmp_path, monkeypatch):
    raw = yaml.safe_load(PAPER.read_text())
    raw["model"]["language_model"] = {"tiny": {}}
    raw["model"]["dtype"] = "float32"
    small = tmp_path / "paper_tiny.yaml"
    small.write_text(yaml.safe_dump(raw))
    assert main(["init", "--config", str(small), "--out", str(tmp_path / "m")]) == 0
    model, processor = load_slice_model(tmp_path / "m")
    assert slice_config_of(model).feature_tokens == 8192 and slice_config_of(model).fps == 4.0


def test_feature_tokens_resample_cached_features_for_the_language_model(tmp_path):
    import nibabel as nib

    from reasonknee3d.answer import format_answer
    from reasonknee3d.data.release import Sample
    from reasonknee3d.schema import get_question

    tiny = default_tiny_qwen_dir(tmp_path)
    full_cfg = SliceBaselineConfig(language_model={"path": str(tiny)}, num_bins=16, frame_size=(56, 56), num_frames=6,
                                   window_mode="percentile", window=(1, 99), fps=4.0)
    cfg = SliceBaselineConfig(**{**full_cfg.to_dict(), "feature_tokens": 20})
    model, processor = build_slice_model(cfg)
    model.eval()
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 500, (12, 40, 50)).astype(np.int16), np.eye(4)),
             str(path))
    vol, meta = load_volume(path)
    full, full_grid = compute_video_features(model, processor, full_cfg, volume_to_frames(vol, full_cfg))
    feats, grid = compute_video_features(model, processor, cfg, volume_to_frames(vol, cfg))
    assert full.shape[0] == 3 * 2 * 2 == int(full_grid.prod()) // 4 and feats.shape == (20, full.shape[1])
    assert grid.tolist() == [20, 2, 2]
    picks = np.linspace(0, full.shape[0] - 1, 20).astype(int)
    assert torch.equal(feats, full[picks])  # evenly spaced picks, repeats when fewer tokens than asked
    assert SliceFeatureCache(tmp_path / "c", "v", cfg).key(path) != SliceFeatureCache(tmp_path / "c", "v", full_cfg).key(path)

    spec = get_question(1)
    sev = {k: 0 for k in spec.field_keys}
    sample = Sample(sample_id="v:q1", volume_id="v", patient_id="p", split="train", image_path=path.resolve(),
                    mask_path=None, question_id=1, prompt="Grade it.",
                    answer=format_answer(spec, ["Look."], [1, 5, 3, 20, 4, 30], sev), severity=sev,
                    box=[1, 5, 3, 20, 4, 30], knee_side="right")
    cache = SliceFeatureCache.for_model(tmp_path / "cache", model, cfg)
    cache.save(path, CachedFeatures(feats, grid, meta.shape))
    batch = SliceCollator(processor, cfg, cache)([sample])
    assert int((batch["mm_token_type_ids"] == 2).sum()) == 20 and batch["video_grid_thw"].tolist() == [[20, 2, 2]]
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="feature_tokens=20 resamples cached vision features"):
        SliceCollator(processor, cfg, None, train=False)


def test_slice_minmax_window_scales_each_slice_after_the_clip():
    cfg = SliceBaselineConfig(window_mode="slice_minmax", window=(0, 400))
    vol = np.stack([np.linspace(100, 200, 12).reshape(3, 4), np.linspace(0, 900, 12).reshape(3, 4),
                    np.full((3, 4), 50.0)]).astype(np.float32)
    out = window_to_uint8(vol, cfg)
    assert out[0].min() == 0 and out[0].max() == 255  # a dim slice spans the full range on its own
    clipped = np.clip(vol[1], 0, 400)
    assert np.array_equal(out[1], np.rint(clipped / 400 * 255).astype(np.uint8))
    assert out[2].max() == 0
