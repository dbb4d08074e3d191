"""ReasonKnee3DForConditionalGeneration: splicing, M-RoPE positions, gradients, caching, save/load, Qwen import."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, Qwen2_5_VLForConditionalGeneration

from reasonknee3d.constants import VOLUME_PAD
from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration


def _model(config) -> ReasonKnee3DForConditionalGeneration:
    torch.manual_seed(0)
    return ReasonKnee3DForConditionalGeneration(config).eval()


def test_one_backward_pass_reaches_every_parameter(toy):
    cfg = toy.config()
    model = _model(cfg).train()
    batch = toy.batch(cfg)
    out = model(**batch, labels=batch["input_ids"])
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name}: zero or non-finite gradient"


def test_volume_tokens_on_different_slices_get_different_depth_positions(toy):
    cfg = toy.config()  # projected grid (D, H, W) = (4, 2, 2)
    model = _model(cfg)
    ids = toy.batch(cfg, batch=1, text_before=3)["input_ids"]
    pos, delta = model.model.get_rope_index(ids, None, cfg.visual_grid)
    vol = pos[:, 0, 3:3 + 16]  # (3, 16): grid order (d, h, w) row-major
    first_slice, second_slice = vol[:, 0], vol[:, 4]  # (d=0, h=0, w=0) and (d=1, h=0, w=0)
    assert first_slice[0] != second_slice[0] and torch.equal(first_slice[1:], second_slice[1:])
    assert vol[0].unique().numel() == 4 and vol[1].unique().numel() == 2 and vol[2].unique().numel() == 2
    assert torch.equal(vol[:, 0], torch.tensor([3, 3, 3]))  # offset = preceding text length
    # Text before: same index on every axis; text after resumes at offset + max(grid) = 3 + 4.
    assert torch.equal(pos[:, 0, :3], torch.arange(3).expand(3, -1))
    assert torch.equal(pos[:, 0, 19:], (torch.arange(4) + 7).expand(3, -1))
    assert delta.item() == pos.max() + 1 - ids.shape[1]


def test_forward_uses_the_3d_positions(toy):
    cfg = toy.config()
    model = _model(cfg)
    batch = toy.batch(cfg)
    pos, _ = model.model.get_rope_index(batch["input_ids"], None, cfg.visual_grid)
    with torch.no_grad():
        auto = model(**batch).logits
        explicit = model(**batch, position_ids=pos).logits
        flat = model(**batch, position_ids=torch.arange(pos.shape[-1]).expand(3, 2, -1)).logits
    torch.testing.assert_close(auto, explicit)
    assert not torch.allclose(auto, flat)


def test_left_padding_gives_the_same_positions_and_logits(toy):
    cfg = toy.config()
    model = _model(cfg)
    batch = toy.batch(cfg, batch=1)
    pad = 3
    padded = {"input_ids": torch.cat([torch.zeros(1, pad, dtype=torch.long), batch["input_ids"]], 1),
              "attention_mask": torch.cat([torch.zeros(1, pad, dtype=torch.long), batch["attention_mask"]], 1),
              "volumes": batch["volumes"]}
    with torch.no_grad():
        a = model(**batch).logits
        b = model(**padded).logits[:, pad:]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_placeholder_feature_count_mismatch_names_both_counts(toy):
    cfg = toy.config()
    model = _model(cfg)
    batch = toy.batch(cfg)
    batch["input_ids"][0, 5] = 7  # one placeholder fewer: 31 tokens for 2 x 16 features
    with pytest.raises(ValueError, match=rf"31 {VOLUME_PAD.replace('|', '[|]')} tokens.*2 volume\(s\) gave 32"):
        model(**batch)


def test_kv_cache_generation_matches_uncached_generation(toy):
    cfg = toy.config()
    model = _model(cfg)
    batch = toy.batch(cfg)
    # Left-pad the second row so positions also have to respect the attention mask.
    batch["input_ids"][1, :2] = 0
    batch["attention_mask"][1, :2] = 0
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    cached = model.generate(**batch, use_cache=True, **kw)
    uncached = model.generate(**batch, use_cache=False, **kw)
    assert cached.shape == (2, batch["input_ids"].shape[1] + 8)
    assert torch.equal(cached, uncached)


def test_cached_step_without_position_ids_continues_mrope(toy):
    cfg = toy.config()
    model = _model(cfg)
    batch = toy.batch(cfg, batch=1)
    nxt = torch.tensor([[5]])
    with torch.no_grad():
        full = model(input_ids=torch.cat([batch["input_ids"], nxt], 1), volumes=batch["volumes"]).logits[:, -1]
        prefill = model(input_ids=batch["input_ids"], volumes=batch["volumes"], use_cache=True)
        step = model(input_ids=nxt, past_key_values=prefill.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(full, step, atol=1e-5, rtol=1e-4)


def test_save_and_auto_load_give_identical_logits(toy, tmp_path):
    cfg = toy.config()
    model = _model(cfg)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    batch = toy.batch(cfg)
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        loaded = auto.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, ReasonKnee3DForConditionalGeneration)
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_from_qwen2_5_vl_copies_the_language_model_exactly(tiny_qwen_dir):
    model, processor = ReasonKnee3DForConditionalGeneration.from_qwen2_5_vl(
        tiny_qwen_dir, encoder_config={"input_size": [8, 16, 16], "patch_size": [2, 8, 8], "hidden_size": 16,
                                       "num_attention_heads": 2, "intermediate_size": 32},
        num_bins=16, attn_implementation="sdpa")
    source = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen_dir)
    src_lm, new_lm = source.model.language_model.state_dict(), model.model.language_model.state_dict()
    assert set(src_lm) == set(new_lm)
    old_vocab = processor.tokenizer.convert_tokens_to_ids("<|coord_0|>")  # first added token
    for key, value in src_lm.items():
        if key == "embed_tokens.weight":
            assert torch.equal(new_lm[key][:old_vocab], value[:old_vocab])
            new_rows = new_lm[key][old_vocab:old_vocab + 17]  # 16 coordinate tokens + <|volume_pad|>
            assert torch.isfinite(new_rows).all() and not torch.equal(new_rows, value[old_vocab:old_vocab + 17])
        else:
            assert torch.equal(new_lm[key], value), key
    torch.testing.assert_close(model.lm_head.weight[:old_vocab], source.lm_head.weight[:old_vocab], rtol=0, atol=0)
    assert not any("visual" in k for k in model.state_dict())
    tok = processor.tokenizer
    assert model.config.volume_token_id == tok.convert_tokens_to_ids(VOLUME_PAD)
    assert model.config.coord_token_ids == tok.convert_tokens_to_ids([f"<|coord_{k}|>" for k in range(16)])
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_from_qwen2_5_vl_does_not_randomly_initialize_what_it_copies(tiny_qwen_dir, monkeypatch):
    # At Qwen2.5-VL-3B's size the language model's random init, thrown away by the copy, was most of a build.
    drawn = []
    for name in ("normal_", "uniform_", "trunc_normal_"):
        if hasattr(torch.Tensor, name):
            original = getattr(torch.Tensor, name)
            def counting(self, *args, _original=original, **kwargs):
                drawn.append(self.numel())
                return _original(self, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counting)
    model, processor = ReasonKnee3DForConditionalGeneration.from_qwen2_5_vl(
        tiny_qwen_dir, encoder_config={"input_size": [8, 16, 16], "patch_size": [2, 8, 8], "hidden_size": 16,
                                       "num_attention_heads": 2, "intermediate_size": 32},
        num_bins=16, attn_implementation="sdpa")
    monkeypatch.undo()
    from transformers import Qwen2_5_VLConfig
    lm = model.model.language_model
    embed = model.get_input_embeddings().weight
    copied_rows = Qwen2_5_VLConfig.from_pretrained(tiny_qwen_dir).text_config.vocab_size
    fresh = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("model.language_model."))
    # What is drawn: the parts built fresh (encoder, projector; each drawn by torch's default init and again by
    # post_init) and the embedding rows the checkpoint lacks, never the copied language model (before: every
    # tensor of it twice, and the tied head twice more).
    assert sum(drawn) <= 2 * fresh + embed[copied_rows:].numel(), sorted(drawn)
    assert all(torch.isfinite(p).all() for p in lm.parameters())
    grown = embed[len(processor.tokenizer):]  # spare rows past the tokenizer, if the vocabulary grew
    if grown.shape[0] > 1:
        assert 0.5 * model.config.text_config.initializer_range < grown.float().std() < 2.0 * 0.02


def test_saved_directory_never_contains_the_vision_tower(rk3d_dir):
    with safe_open(str(rk3d_dir / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and not any("visual" in k for k in keys)
    assert any(k.startswith("model.encoder.") for k in keys) and any(k.startswith("model.projector.") for k in keys)


def test_from_qwen2_5_vl_copies_an_untied_lm_head(tiny_qwen_dir, tmp_path):
    from transformers import AutoTokenizer, Qwen2_5_VLConfig
    cfg = Qwen2_5_VLConfig.from_pretrained(tiny_qwen_dir)
    cfg.tie_word_embeddings = cfg.text_config.tie_word_embeddings = False
    torch.manual_seed(1)
    source = Qwen2_5_VLForConditionalGeneration(cfg)
    source.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_qwen_dir).save_pretrained(tmp_path)
    model, processor = ReasonKnee3DForConditionalGeneration.from_qwen2_5_vl(
        tmp_path, encoder_config={"input_size": [8, 16, 16], "patch_size": [2, 8, 8], "hidden_size": 16,
                                  "num_attention_heads": 2, "intermediate_size": 32}, num_bins=16)
    old_vocab = processor.tokenizer.convert_tokens_to_ids("<|coord_0|>")
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.lm_head.weight[:old_vocab], source.lm_head.weight[:old_vocab])
    assert not torch.equal(model.lm_head.weight[:old_vocab], model.get_input_embeddings().weight[:old_vocab])
