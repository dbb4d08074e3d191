"""Fixtures of the 3D-native model tests: a toy config (no tokenizer) and tiny checkpoint directories."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reasonknee3d.models import register_auto_classes
from reasonknee3d.models.reasonknee3d.configuration_reasonknee3d import ReasonKnee3DConfig
from reasonknee3d.models.tiny_qwen import build_tiny_qwen2_5_vl, mrope_section

TOY_VOLUME_TOKEN = 100
TOY_VOLUME = (8, 16, 16)


def toy_config(**overrides) -> ReasonKnee3DConfig:
    """Encoder grid 4 x 2 x 2 (patch 2 x 8 x 8), one token per patch: 16 volume tokens; vocab 128."""
    kw = dict(
        encoder_config=dict(input_size=list(TOY_VOLUME), patch_size=[2, 8, 8], hidden_size=32,
                            num_hidden_layers=2, num_attention_heads=4, intermediate_size=64),
        projector_config=dict(projector_type="mlp2x_gelu"),
        text_config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": mrope_section(8)}),
        volume_token_id=TOY_VOLUME_TOKEN, num_bins=16)
    kw.update(overrides)
    return ReasonKnee3DConfig(**kw)


def toy_batch(config: ReasonKnee3DConfig, batch: int = 2, text_before: int = 3, text_after: int = 4,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids = text, one volume block, text (no padding), and matching volumes."""
    g = torch.Generator().manual_seed(seed)
    n = config.num_visual_tokens
    before = torch.randint(1, 90, (batch, text_before), generator=g)
    after = torch.randint(1, 90, (batch, text_after), generator=g)
    ids = torch.cat([before, torch.full((batch, n), TOY_VOLUME_TOKEN), after], dim=1)
    volumes = torch.randn(batch, 1, *config.encoder_config.input_size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "volumes": volumes}


@pytest.fixture(scope="session", autouse=True)
def _auto_classes() -> None:
    register_auto_classes()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # The models here are tiny: with several threads on a shared CPU, OpenMP synchronisation costs more
    # than the arithmetic (a 24-row generate took 29 s with 2 threads under load, 1 s with one).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def toy() -> SimpleNamespace:
    """``toy.config(**overrides)``, ``toy.batch(config, ...)``, ``toy.volume_token``."""
    return SimpleNamespace(config=toy_config, batch=toy_batch, volume_token=TOY_VOLUME_TOKEN)


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2.5-VL checkpoint written with save_pretrained (as the real one is laid out)."""
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("lm") / "tiny-qwen", hidden_size=32, intermediate_size=64,
                                 num_attention_heads=4, num_key_value_heads=2, bpe_vocab_size=600)


@pytest.fixture(scope="session")
def rk3d_dir(tiny_qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ReasonKnee3D directory made by from_qwen2_5_vl: volume 8 x 16 x 16, 16 visual tokens, K = 16."""
    from reasonknee3d.models import save_model_dir
    from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration
    torch.manual_seed(0)
    model, processor = ReasonKnee3DForConditionalGeneration.from_qwen2_5_vl(
        tiny_qwen_dir, encoder_config=toy_config().encoder_config.to_dict(),
        projector_config={"projector_type": "mlp2x_gelu"}, num_bins=16, attn_implementation="sdpa")
    return save_model_dir(model, processor, tmp_path_factory.mktemp("rk3d") / "model")
