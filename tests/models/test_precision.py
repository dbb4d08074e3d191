"""The real-size dtype path of the 3D model: bf16 on CPU, float32 parts under a bf16 LM, no deprecation warnings."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration
from reasonknee3d.models.reasonknee3d.projectors import pool_grid

COORDS = list(range(101, 117))
BOX_START, BOX_END = 120, 121


def _real_like_config(toy):
    """The toy model with the real config's parts: pool3d_mlp projector and the region look."""
    return toy.config(projector_config={"projector_type": "pool3d_mlp", "pool_kernel": [2, 1, 2]},
                      region_size=[4, 8, 8], coord_token_ids=COORDS, box_start_token_id=BOX_START,
                      box_end_token_id=BOX_END)


def _with_box(toy, cfg) -> dict[str, torch.Tensor]:
    batch = toy.batch(cfg)
    box = torch.tensor([[BOX_START, 101, 105, 102, 110, 103, 116, BOX_END]] * 2)  # bins 0 4 1 9 2 15
    batch["input_ids"] = torch.cat([batch["input_ids"], box, torch.tensor([[7, 8]] * 2)], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


def test_pool_grid_is_avg_pool3d():
    x = torch.randn(2, 4 * 6 * 6, 5)
    ref = F.avg_pool3d(x.transpose(1, 2).reshape(2, 5, 4, 6, 6), 2, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pool_grid(x, (4, 6, 6), (2, 2, 2)), ref)
    # bfloat16 on CPU has no avg_pool3d kernel; the reshape-mean runs and stays close to float32.
    torch.testing.assert_close(pool_grid(x.bfloat16(), (4, 6, 6), (2, 2, 2)).float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("whole_model_bf16", [True, False])
def test_bf16_model_runs_forward_backward_and_generate_on_cpu(toy, whole_model_bf16):
    """Every op on the path has a bf16 CPU kernel: a whole-bf16 model, and the built layout (float32 encoder and
    projectors under a bf16 language model)."""
    cfg = _real_like_config(toy)
    torch.manual_seed(0)
    model = ReasonKnee3DForConditionalGeneration(cfg).to(torch.bfloat16)
    if not whole_model_bf16:
        for name in model._keep_in_fp32_modules_strict:
            getattr(model.model, name).float()
    assert model.dtype == torch.bfloat16  # the language model's dtype, written to config.json on save
    batch = _with_box(toy, cfg)
    out = model.train()(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.model.region_projector.mlp[0].weight.grad.abs().sum() > 0
    gen = model.eval().generate(**toy.batch(cfg), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape[1] == toy.batch(cfg)["input_ids"].shape[1] + 3


def test_generate_emits_no_deprecation_warnings(toy):
    cfg = _real_like_config(toy)
    torch.manual_seed(0)
    model = ReasonKnee3DForConditionalGeneration(cfg).eval()
    batch = _with_box(toy, cfg)  # a box in the prompt: cached steps carry the region feature
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        gen = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
        # Explicit cache steps, under both names of the cache argument.
        prefill = model(**batch, use_cache=True)
        nxt = gen[:, batch["input_ids"].shape[1]:][:, :1]
        a = model(input_ids=nxt, cache=prefill.cache, use_cache=True, region_volumes=batch["volumes"],
                  context_ids=torch.cat([batch["input_ids"], nxt], 1), region_embeds=prefill.region_embeds)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 4 and torch.isfinite(a.logits).all()


def test_from_qwen_in_bf16_keeps_the_new_parts_fp32_and_reloads_so(tiny_qwen_dir, toy, tmp_path):
    model, processor = ReasonKnee3DForConditionalGeneration.from_qwen2_5_vl(
        tiny_qwen_dir, encoder_config=toy.config().encoder_config.to_dict(),
        projector_config={"projector_type": "pool3d_mlp", "pool_kernel": [2, 2, 2]}, num_bins=16,
        attn_implementation="sdpa", dtype="bfloat16", region_size=[4, 8, 8])
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    for name, dtype in dtypes.items():
        new_part = name.startswith(("model.encoder.", "model.projector.", "model.region_projector."))
        assert dtype == (torch.float32 if new_part else torch.bfloat16), name
    model.save_pretrained(tmp_path / "m")
    again = ReasonKnee3DForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert {n: p.dtype for n, p in again.named_parameters()} == dtypes
    assert json.loads((tmp_path / "m" / "config.json").read_text()).get("float32_modules") is None  # nothing extra


def _saved(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_float32_parts_beside_bf16_ones_are_listed_and_reload_exactly(tiny_qwen_dir, toy, tmp_path):
    model, _ = ReasonKnee3DForConditionalGeneration.from_qwen2_5_vl(
        tiny_qwen_dir, encoder_config=toy.config().encoder_config.to_dict(), num_bins=16,
        attn_implementation="sdpa", dtype="bfloat16")
    # A trained, float32 output layer and one float32 norm in a bfloat16 language model, values off bf16's grid.
    norm = model.model.language_model.layers[0].input_layernorm
    for part in (model.lm_head, norm):
        part.float()
        with torch.no_grad():
            for p in part.parameters():
                p.add_(1e-4 * torch.arange(p.numel()).reshape(p.shape))
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    tied = model.lm_head.weight is model.get_input_embeddings().weight  # then the embedding is float32 too
    assert config["float32_modules"] == ["model.language_model.embed_tokens"] * tied + [
        "model.language_model.layers.0.input_layernorm", "lm_head"]
    saved = _saved(tmp_path / "m")
    assert saved["model.language_model.layers.0.input_layernorm.weight"].dtype == torch.float32
    assert saved["model.language_model.layers.1.input_layernorm.weight"].dtype == torch.bfloat16

    again = ReasonKnee3DForConditionalGeneration.from_pretrained(tmp_path / "m")
    want = dict(model.named_parameters())
    got = dict(again.named_parameters())
    assert {n: p.dtype for n, p in got.items()} == {n: p.dtype for n, p in want.items()}
    assert got["model.language_model.layers.1.input_layernorm.weight"].dtype == torch.bfloat16  # frozen: bf16
    for name, p in got.items():
        torch.testing.assert_close(p, want[name], rtol=0, atol=0, msg=name)


def test_an_all_float32_model_under_a_bf16_config_saves_as_float32(tiny_qwen_dir, toy, tmp_path):
    model, _ = ReasonKnee3DForConditionalGeneration.from_qwen2_5_vl(
        tiny_qwen_dir, encoder_config=toy.config().encoder_config.to_dict(), num_bins=16,
        attn_implementation="sdpa", dtype="bfloat16")
    model.model.language_model.float()
    model.lm_head.float()
    with torch.no_grad():
        model.lm_head.weight.add_(1e-4)  # not representable in bfloat16 next to the weights' values
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == "float32" and config.get("float32_modules") is None
    again = ReasonKnee3DForConditionalGeneration.from_pretrained(tmp_path / "m")
    assert all(p.dtype == torch.float32 for p in again.parameters())
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
