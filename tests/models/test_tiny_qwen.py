"""The tiny Qwen2.5-VL checkpoint loads through the same Auto classes as the real 3B directory."""
from __future__ import annotations

import pytest

from reasonknee3d.config import from_mapping
from reasonknee3d.constants import IMAGE_PAD, IM_END, QWEN_SPECIAL_TOKENS, VIDEO_PAD, VISION_END, VISION_START
from reasonknee3d.models.tiny_qwen import (TinyQwenSizes, build_tiny_qwen2_5_vl, default_tiny_qwen_dir,
                                           mrope_section)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return default_tiny_qwen_dir(tmp_path_factory.getbasetemp())


def test_loads_like_a_real_checkpoint(tiny_dir):
    from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    proc = AutoProcessor.from_pretrained(tiny_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir)
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    assert type(proc.video_processor).__name__ == "Qwen2VLVideoProcessor"
    for t in QWEN_SPECIAL_TOKENS:
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    cfg = model.config
    assert cfg.image_token_id == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert cfg.video_token_id == tok.convert_tokens_to_ids(VIDEO_PAD)
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids(VISION_START)
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids(VISION_END)
    assert tok.eos_token == IM_END
    # Spare embedding rows beyond the tokenizer, as in the real checkpoint.
    assert cfg.text_config.vocab_size > len(tok)
    head_dim = cfg.text_config.hidden_size // cfg.text_config.num_attention_heads
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == head_dim // 2
    assert cfg.vision_config.out_hidden_size == cfg.text_config.hidden_size
    # The chat template is a real Jinja template saved with the tokenizer.
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert f"{VISION_START}{VIDEO_PAD}{VISION_END}hi<|im_end|>" in text
    assert "You are a helpful assistant." in text


def test_tiny_model_runs_a_video_through_the_processor(tiny_dir):
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    proc = AutoProcessor.from_pretrained(tiny_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir).eval()
    video = torch.randint(0, 255, (4, 3, 56, 56), dtype=torch.uint8)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "x"}]}],
                                    add_generation_prompt=True)
    batch = proc(text=[text], videos=[video], return_tensors="pt",
                 videos_kwargs=dict(size={"shortest_edge": 56 * 56, "longest_edge": 56 * 56},
                                    cap_pixels_per_frame=False, do_sample_frames=False))
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.logits).all()


def test_extra_corpus_is_learned(tmp_path):
    from transformers import AutoTokenizer

    word = "zyxwzyxwzyxw"
    path = build_tiny_qwen2_5_vl(tmp_path / "t", corpus=[word] * 200, bpe_vocab_size=1100)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok(word, add_special_tokens=False).input_ids) <= 2


def test_default_dir_is_built_once(tmp_path):
    first = default_tiny_qwen_dir(tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = default_tiny_qwen_dir(tmp_path)
    assert again == first == tmp_path / "checkpoints" / "tiny-qwen2.5-vl"
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.joinpath("checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("head_dim", [8, 16, 32, 128])
def test_mrope_section_sums_to_half_head_dim(head_dim):
    sec = mrope_section(head_dim)
    assert sum(sec) == head_dim // 2 and min(sec) >= 1
    if head_dim == 128:
        assert sec == [16, 24, 24]  # the real Qwen2.5-VL value


def test_sizes_are_validated():
    with pytest.raises(ValueError, match="hidden_sise"):
        from_mapping(TinyQwenSizes, {"hidden_sise": 64}, "tiny")
    with pytest.raises(ValueError, match="not divisible"):
        TinyQwenSizes(hidden_size=66, num_attention_heads=4)
