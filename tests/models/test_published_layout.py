"""Checkpoints in the published Qwen2.5-VL key layout (``model.layers.*``, ``visual.*``, no ``lm_head`` when tied)
load through both families."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration
from reasonknee3d.models.slice.configuration_slice import SliceBaselineConfig
from reasonknee3d.models.slice.modeling_slice import build_slice_model


def _published_key(key: str) -> str | None:
    """Any Qwen2.5-VL key -> the key the published Qwen/Qwen2.5-VL-3B-Instruct safetensors use."""
    if key == "lm_head.weight":
        return None  # tied to the embedding: the published 3B files have no lm_head tensor
    key = re.sub(r"^model\.language_model\.", "model.", key)
    return re.sub(r"^model\.visual\.", "visual.", key)


def _v5_key(key: str) -> str:
    """A published key -> transformers 5's module layout (``model.language_model.*``, ``model.visual.*``)."""
    if key.startswith("visual."):
        return "model." + key
    return re.sub(r"^model\.", "model.language_model.", key)


def _rewrite(src: Path, out: Path, layout: str) -> Path:
    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    published = {new: v.clone() for k, v in tensors.items() if (new := _published_key(k)) is not None}
    if layout == "published":
        keys = published
        assert "lm_head.weight" not in keys
        assert any(k.startswith("model.layers.") for k in keys) and any(k.startswith("visual.") for k in keys)
    else:
        keys = {_v5_key(k): v for k, v in published.items()}
        keys["lm_head.weight"] = keys["model.language_model.embed_tokens.weight"].clone()
    save_file(keys, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def layouts(tiny_qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {name: _rewrite(tiny_qwen_dir, root / name, name) for name in ("published", "v5")}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


def test_3d_model_reads_the_published_layout(layouts: dict[str, Path], toy) -> None:
    kw = dict(encoder_config=toy.config().encoder_config.to_dict(), projector_config={"projector_type": "mlp2x_gelu"},
              num_bins=16, attn_implementation="sdpa")
    torch.manual_seed(0)
    ref, _ = ReasonKnee3DForConditionalGeneration.from_qwen2_5_vl(layouts["v5"], **kw)
    torch.manual_seed(0)
    got, _ = ReasonKnee3DForConditionalGeneration.from_qwen2_5_vl(layouts["published"], **kw)
    ref_lm, got_lm = _state(ref.model.language_model), _state(got.model.language_model)
    assert ref_lm.keys() == got_lm.keys()
    for k in ref_lm:
        torch.testing.assert_close(got_lm[k], ref_lm[k], rtol=0, atol=0, msg=k)
    assert got.lm_head.weight.data_ptr() == got.model.language_model.embed_tokens.weight.data_ptr()  # tied


def test_slice_family_reads_the_published_layout(layouts: dict[str, Path]) -> None:
    base = dict(num_bins=16, frame_size=(56, 56), num_frames=6)
    ref, _ = build_slice_model(SliceBaselineConfig(language_model={"path": str(layouts["v5"])}, **base), "sdpa")
    got, _ = build_slice_model(SliceBaselineConfig(language_model={"path": str(layouts["published"])}, **base), "sdpa")
    ref_sd, got_sd = _state(ref), _state(got)
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(got_sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    assert any(k.startswith("model.visual.") for k in got_sd)
    assert got.lm_head.weight.data_ptr() == got.get_input_embeddings().weight.data_ptr()
