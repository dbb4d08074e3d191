"""Slice baseline: frames, token counts, processor equivalence, cached-feature forward, save/reload/generate."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from reasonknee3d.answer import format_answer
from reasonknee3d.constants import IGNORE_INDEX, VIDEO_PAD
from reasonknee3d.data.io import load_volume
from reasonknee3d.data.release import Sample
from reasonknee3d.models.chat import encode_example
from reasonknee3d.families import get_family, load_experiment_config
from reasonknee3d.families.slice import slice_predict_collate
from reasonknee3d.evaluation.generate import generate_answers
from reasonknee3d.models.slice.configuration_slice import SLICE_CONFIG_ATTR, SliceBaselineConfig
from reasonknee3d.models.slice.features import CachedFeatures, SliceFeatureCache, compute_video_features
from reasonknee3d.models.slice.modeling_slice import build_slice_model, load_slice_model
from reasonknee3d.models.slice.processing_slice import (SliceCollator, crop_to_box, media_text, select_slices,
                                                        token_count, video_processor_kwargs, video_token_count,
                                                        volume_to_frames, window_to_uint8)
from reasonknee3d.models.tiny_qwen import default_tiny_qwen_dir
from reasonknee3d.schema import get_question

import reasonknee3d

PRESETS = Path(reasonknee3d.__file__).parent / "configs"

SHAPE = (12, 40, 50)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return default_tiny_qwen_dir(tmp_path_factory.getbasetemp())


def make_cfg(tiny_dir: Path, **kw) -> SliceBaselineConfig:
    base = dict(language_model={"path": str(tiny_dir)}, num_bins=16, frame_size=(56, 56), num_frames=6,
                window_mode="percentile", window=(1, 99))
    return SliceBaselineConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def built(tiny_dir):
    cfg = make_cfg(tiny_dir)
    model, processor = build_slice_model(cfg)
    return cfg, model.eval(), processor


def make_samples(root: Path, n: int = 2) -> list[Sample]:
    rng = np.random.default_rng(0)
    spec = get_question(1)
    out = []
    for i in range(n):
        path = root / f"vol{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.integers(0, 500, SHAPE).astype(np.int16), np.diag([0.7, 0.365, 0.365, 1])),
                 str(path))
        sev = {k: i % 2 for k in spec.field_keys}
        box = [1, 5 + i, 3, 20, 4, 30]
        out.append(Sample(sample_id=f"vol{i}:q1", volume_id=f"vol{i}", patient_id="p", split="train",
                          image_path=path.resolve(), mask_path=None, question_id=1, prompt="Grade it." + " Now." * i,
                          answer=format_answer(spec, ["Look at the patella."], box, sev), severity=sev, box=box,
                          knee_side="right"))
    return out


def fill_cache(cache, model, processor, cfg, samples) -> None:
    for s in samples:
        vol, meta = load_volume(s.image_path)
        feats, grid = compute_video_features(model, processor, cfg, volume_to_frames(vol, cfg))
        cache.save(s.image_path, CachedFeatures(feats, grid, meta.shape))


def test_config_validation_names_the_field(tiny_dir):
    with pytest.raises(ValueError, match="model.frame_sise"):
        SliceBaselineConfig.from_dict({"frame_sise": [56, 56]})
    with pytest.raises(ValueError, match="multiples of patch_size"):
        SliceBaselineConfig(frame_size=(50, 56))
    with pytest.raises(ValueError, match="slice_range"):
        SliceBaselineConfig(slice_range=(0.6, 0.4))
    with pytest.raises(ValueError, match="language_model"):
        SliceBaselineConfig(language_model={"path": "a", "tiny": {}})
    cfg = SliceBaselineConfig.from_dict({"frame_size": [56, 84], "window": [0, 400]})
    assert cfg.frame_size == (56, 84) and cfg.pixel_limits == (56 * 84, 56 * 84)


def test_slice_selection_and_window():
    cfg = SliceBaselineConfig(num_frames=4)
    assert select_slices(160, cfg).tolist() == [20, 60, 100, 140]
    assert select_slices(160, SliceBaselineConfig()).tolist() == list(range(160))
    assert select_slices(160, SliceBaselineConfig(slice_range=(0.5, 1.0))).tolist() == list(range(80, 160))
    assert select_slices(2, cfg).tolist() == [0, 0, 1, 1]  # thinner than asked: repeat, keep the count
    vol = np.array([[[-10.0, 0.0, 200.0, 400.0, 900.0]]])
    assert window_to_uint8(vol, SliceBaselineConfig()).tolist() == [[[0, 0, 128, 255, 255]]]


def test_frames_and_crop():
    cfg = SliceBaselineConfig(num_frames=3, frame_size=(28, 56), crop_margin=1)
    vol = np.zeros((10, 20, 30), dtype=np.float32)
    vol[4:6, 5:10, 7:12] = 400.0
    frames = volume_to_frames(vol, cfg)
    assert frames.shape == (3, 3, 28, 56) and frames.dtype == torch.uint8
    crop = crop_to_box(vol, [4, 5, 5, 9, 7, 11], margin=1)
    assert crop.shape == (4, 7, 7)
    assert crop_to_box(vol, [0, 1, 0, 2, 0, 3], margin=3).shape == (5, 6, 7)  # clipped at the border
    cropped = volume_to_frames(vol, cfg, box=[4, 5, 5, 9, 7, 11])
    assert cropped.float().mean() > frames.float().mean()  # the bright region fills the cropped frames


def test_token_count_matches_the_processor(built):
    cfg, model, processor = built
    vol = np.random.default_rng(1).normal(200, 50, SHAPE).astype(np.float32)
    for c in (cfg, SliceBaselineConfig(**{**cfg.to_dict(), "num_frames": 5, "frame_size": [84, 56]}),
              SliceBaselineConfig(**{**cfg.to_dict(), "num_frames": None})):
        feats, grid = compute_video_features(model, processor, c, volume_to_frames(vol, c))
        assert feats.shape[0] == token_count(c, SHAPE) == video_token_count(grid, c.merge_size)
    # Real-size arithmetic: 160 slices of 224x224 -> 80 temporal x 8 x 8 merged patches.
    assert token_count(SliceBaselineConfig(), (160, 384, 384)) == 80 * 8 * 8


def test_encoding_matches_qwen_processor(built):
    """Our own placeholder expansion gives the ids and mm_token_type_ids of Qwen's processor."""
    cfg, model, processor = built
    frames = volume_to_frames(np.random.default_rng(2).normal(size=SHAPE).astype(np.float32), cfg)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Grade it."}]}],
        add_generation_prompt=True)
    ref = processor(text=[text], videos=[frames], return_tensors="pt", videos_kwargs=video_processor_kwargs(cfg))
    n = video_token_count(ref["video_grid_thw"][0], cfg.merge_size)
    ours = encode_example(processor.tokenizer, "Grade it.", None, media_text(n))["input_ids"]
    assert ours == ref["input_ids"][0].tolist()
    video_id = processor.tokenizer.convert_tokens_to_ids(VIDEO_PAD)
    assert ((torch.tensor(ours) == video_id).long() * 2).tolist() == ref["mm_token_type_ids"][0].tolist()


def test_cached_features_give_the_same_loss_as_pixels(built, tmp_path):
    cfg, model, processor = built
    samples = make_samples(tmp_path)
    cache = SliceFeatureCache.for_model(tmp_path / "cache", model, cfg)
    fill_cache(cache, model, processor, cfg, samples)
    cached, pixels = SliceCollator(processor, cfg, cache)(samples), SliceCollator(processor, cfg)(samples)
    assert "pixel_values_videos" not in cached and "mm_encoder_outputs" in cached
    assert torch.equal(cached["input_ids"], pixels["input_ids"])
    # M-RoPE needs the video tokens marked; labels only on the answer (with coordinate tokens).
    assert (cached["mm_token_type_ids"] == 2).sum() == 2 * token_count(cfg, SHAPE)
    sup = cached["labels"][0][cached["labels"][0] != IGNORE_INDEX]
    text = processor.tokenizer.decode(sup, skip_special_tokens=False)
    assert "<|coord_" in text and "[1, 5" not in text and text.endswith("<|im_end|>")
    with torch.no_grad():
        a, b = model(**cached), model(**pixels)
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.isclose(a.loss, b.loss, atol=1e-6)
    # Gradients reach the language model through cached features.
    model.zero_grad()
    model(**cached).loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in model.model.visual.parameters())
    model.zero_grad()


def _generate(model, processor, cfg, samples, max_new_tokens=4):
    batch, infos = slice_predict_collate(SliceCollator(processor, cfg, train=False))(samples)
    return generate_answers(model, processor, get_family("slice"), batch, [i.question_id for i in infos],
                            [i.orig_shape for i in infos], constrained=False, max_new_tokens=max_new_tokens)


def test_a_saved_adapter_reloads_and_generates(tiny_dir, tmp_path):
    """A folder holding the base weights and a LoRA adapter side by side (as training writes it) loads with the
    adapter applied."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from reasonknee3d.config import TrainConfig
    from reasonknee3d.families.slice import SliceFamily
    from reasonknee3d.training.stages import setup_trainable

    cfg = make_cfg(tiny_dir)
    exp = load_experiment_config("tiny_slice", [f"model={json.dumps(cfg.to_dict())}"])
    out = get_family("slice").init(exp, tmp_path / "slice-init")
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json[SLICE_CONFIG_ATTR]["num_bins"] == 16
    assert not (out / "adapter_config.json").exists()  # init writes no adapter: the trainer adds LoRA
    model, processor = load_slice_model(out)
    family = SliceFamily()
    train = TrainConfig(encoder="frozen", projector="frozen", lora={"r": 4, "alpha": 8})
    setup_trainable(model, train, family.module_paths(model), family.new_token_ids(model, processor)).save_pretrained(out)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["trainable_token_indices"] and "language_model" in adapter["target_modules"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert weights and not any("visual" in k for k in weights)  # LoRA never on the vision blocks
    # Give the adapter a non-zero update, then check from_pretrained applies exactly that adapter.
    gen = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in weights.items()},
              str(out / "adapter_model.safetensors"))
    samples = make_samples(tmp_path)
    model, processor = load_slice_model(out)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    batch = SliceCollator(processor, cfg)(samples[:1])
    # Reference: the base weights alone (a copy of the folder without the adapter) + peft's own loader.
    base_only = tmp_path / "base-only"
    shutil.copytree(out, base_only, ignore=shutil.ignore_patterns("adapter_*"))
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_only).eval()
    with torch.no_grad():
        ours = model.eval()(**batch).logits
        plain = base(**batch).logits
        ref = PeftModel.from_pretrained(base, out).eval()(**batch).logits
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter is really applied
    texts = _generate(model, processor, cfg, samples)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_generation_from_cached_features_matches_pixels(built, tmp_path):
    cfg, model, processor = built
    samples = make_samples(tmp_path)
    cache = SliceFeatureCache.for_model(tmp_path / "cache", model, cfg)
    fill_cache(cache, model, processor, cfg, samples)
    ids = {}
    for name, c in (("cached", cache), ("pixels", None)):
        batch = SliceCollator(processor, cfg, c, train=False)(samples)
        assert (batch["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the last column
        ids[name] = model.generate(**batch, max_new_tokens=6, do_sample=False,
                                   pad_token_id=processor.tokenizer.pad_token_id)
    assert torch.equal(ids["cached"], ids["pixels"])


def test_generate_answers_turns_coordinate_tokens_into_voxel_boxes(built, tmp_path, monkeypatch):
    cfg, model, processor = built
    sample = make_samples(tmp_path, n=1)[0]
    tok = processor.tokenizer
    answer = "Location: <|box_start|><|coord_0|><|coord_15|><|coord_8|><|coord_8|><|coord_1|><|coord_2|><|box_end|>"
    reply = tok(answer + "<|im_end|>junk", add_special_tokens=False).input_ids

    def fake_generate(input_ids, **kwargs):  # the prompt, then the scripted reply
        return torch.cat([input_ids, torch.tensor([reply]).expand(len(input_ids), -1)], dim=1)
    monkeypatch.setattr(model, "generate", fake_generate)
    text = _generate(model, processor, cfg, [sample])[0]
    # Bins of 16 over the source shape (12, 40, 50): bin centres floor((k + 0.5) * L / 16).
    assert text == "Location: <|box_start|>[0, 11, 21, 21, 4, 7]<|box_end|>"


def test_shipped_slice_configs(tmp_path, monkeypatch):
    import yaml

    root = PRESETS
    real = yaml.safe_load((root / "slice_qwen2.5vl_3b.yaml").read_text())
    from reasonknee3d.config import ConfigError
    from reasonknee3d.models.slice.configuration_slice import as_slice_config
    from reasonknee3d.models.slice.modeling_slice import slice_config_of
    load_experiment_config("slice_qwen2.5vl_3b")
    with pytest.raises(ConfigError, match="train.projector"):
        load_experiment_config("slice_qwen2.5vl_3b", ["train.projector=full"])
    assert token_count(real, (160, 384, 384)) == 5120  # all 160 slices, 224 x 224 frames
    tiny = yaml.safe_load((root / "tiny_slice.yaml").read_text())
    assert token_count(tiny, (160, 384, 384)) == 128
    monkeypatch.chdir(tmp_path)  # the tiny checkpoint is built under ./checkpoints
    out = get_family("slice").init(load_experiment_config("tiny_slice"), tmp_path / "tiny-slice")
    model, processor = load_slice_model(out)
    assert slice_config_of(model) == as_slice_config(tiny)
    assert processor.video_processor.size["longest_edge"] == 112 * 112
    assert not (out / "adapter_config.json").exists()  # tiny trains the LM fully: no adapter
