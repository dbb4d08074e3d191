"""ReasonKnee3DConfig: validation, Auto round trip, the experiment YAMLs, and the choice of K."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from transformers import AutoConfig

from reasonknee3d.boxes import dequantize_boxes, iou_3d, quantize_boxes
from reasonknee3d.models.reasonknee3d.configuration_reasonknee3d import ReasonKnee3DConfig

import reasonknee3d

PRESETS = Path(reasonknee3d.__file__).parent / "configs"

CONFIGS = PRESETS


def test_visual_token_count_comes_from_the_config(toy):
    cfg = toy.config(projector_config={"projector_type": "pool3d_mlp", "pool_kernel": [2, 1, 2]})
    assert cfg.encoder_config.grid_size == (4, 2, 2)
    assert cfg.visual_grid == (2, 2, 1) and cfg.num_visual_tokens == 4


def test_default_config_is_the_qwen2_5_vl_3b_language_model():
    cfg = ReasonKnee3DConfig()
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers) == (2048, 36)
    assert cfg.text_config.rope_parameters["mrope_section"] == [16, 24, 24]


def test_auto_config_round_trip(toy, tmp_path):
    cfg = toy.config()
    cfg.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ReasonKnee3DConfig)
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(loaded.to_dict()) == drop(cfg.to_dict())


def test_mrope_section_must_fit_the_head_dim(toy):
    bad = toy.config().text_config.to_dict()
    bad["rope_parameters"]["mrope_section"] = [16, 24, 24]
    with pytest.raises(ValueError, match=r"head_dim/2 = 4.*\[16, 24, 24\]"):
        toy.config(text_config=bad)


def test_coord_token_ids_must_match_num_bins(toy):
    with pytest.raises(ValueError, match="3 ids but num_bins is 16"):
        toy.config(coord_token_ids=[1, 2, 3])


@pytest.mark.parametrize("section, key", [("encoder", "patch"), ("projector", "pool")])
def test_a_misspelled_encoder_or_projector_key_is_an_error(section, key):
    # PreTrainedConfig would keep the typo as an attribute and build the default model instead.
    from reasonknee3d.config import ConfigError
    from reasonknee3d.families import load_experiment_config
    with pytest.raises(ConfigError, match=rf"model\.{section}\.{key}: unknown key for .* expected some of"):
        load_experiment_config("tiny_3d", [f"model.{section}.{key}=[1, 2, 2]"])


@pytest.mark.parametrize("config", ["tiny_3d.yaml", "tiny_slice.yaml"])
def test_a_misspelled_tiny_language_model_size_is_a_config_error(config):
    from reasonknee3d.config import ConfigError
    from reasonknee3d.families import load_experiment_config
    with pytest.raises(ConfigError, match=r"model\.language_model\.tiny\.hiden_size: unknown key"):
        load_experiment_config(CONFIGS / config, ["model.language_model.tiny.hiden_size=64"])


def _visual_tokens(path: Path) -> int:
    from reasonknee3d.families import get_family, load_experiment_config
    exp = load_experiment_config(path)
    return get_family(exp.family).num_visual_tokens(exp, exp.data.input_shape)


def test_real_size_config_stays_within_512_visual_tokens_and_says_how_many():
    # 512 = a tenth of the slice baseline's 5,120 tokens per volume (bench goal tokens_ratio >= 10).
    path = CONFIGS / "rk3d_qwen2.5vl_3b.yaml"
    n = _visual_tokens(path)
    assert n <= 512
    stated = re.search(r"Visual tokens per volume: .*= (\d[\d,]*)", path.read_text())
    assert stated and int(stated.group(1).replace(",", "")) == n


def _lesion_sized_boxes(shape, n=500, seed=0) -> np.ndarray:
    # Extents 5-40 % of each axis: from small lesions to whole subregions.
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        box = []
        for length in shape:
            ext = max(1, int(rng.uniform(0.05, 0.4) * length))
            lo = int(rng.integers(0, length - ext + 1))
            box += [lo, lo + ext - 1]
        out.append(box)
    return np.array(out)


@pytest.mark.parametrize("name,shape", [("rk3d_qwen2.5vl_3b.yaml", (160, 384, 384)),
                                        ("tiny_3d.yaml", (32, 64, 64))])
def test_configured_bins_keep_box_round_trip_iou_above_098(name, shape):
    k = yaml.safe_load((CONFIGS / name).read_text())["model"]["num_bins"]
    boxes = _lesion_sized_boxes(shape)
    back = dequantize_boxes(quantize_boxes(boxes, shape, k), shape, k)
    assert iou_3d(boxes, back).mean() >= 0.98


def _synthetic_release_boxes(tmp_path: Path, shape: tuple[int, int, int], n_volumes: int) -> np.ndarray:
    import json

    from reasonknee3d.data.synth import write_synthetic_release
    write_synthetic_release(tmp_path / "release", n_volumes=n_volumes, shape=shape, seed=0)
    items = [it for split in ("train", "val", "test")
             for it in json.loads((tmp_path / "release/data/generate_data" / f"{split}.json").read_text())]
    return np.array([it["box"] for it in items if it.get("box")])


def _round_trip_iou(boxes: np.ndarray, shape, k: int) -> float:
    return float(iou_3d(boxes, dequantize_boxes(quantize_boxes(boxes, shape, k), shape, k)).mean())


def test_tiny_bins_on_synthetic_release_boxes(tmp_path):
    shape = tuple(yaml.safe_load((CONFIGS / "tiny_3d.yaml").read_text())["data"]["input_shape"])
    k = yaml.safe_load((CONFIGS / "tiny_3d.yaml").read_text())["model"]["num_bins"]
    boxes = _synthetic_release_boxes(tmp_path, shape, n_volumes=4)
    assert len(boxes) > 50 and _round_trip_iou(boxes, shape, k) >= 0.98


@pytest.mark.slow
def test_real_size_bins_on_synthetic_release_boxes(tmp_path):
    # About 40 s: three phantoms at the real 160 x 384 x 384 grid. K = 256 gives 0.966 here, K = 384 gives 1.
    k = yaml.safe_load((CONFIGS / "rk3d_qwen2.5vl_3b.yaml").read_text())["model"]["num_bins"]
    boxes = _synthetic_release_boxes(tmp_path, (160, 384, 384), n_volumes=3)
    assert _round_trip_iou(boxes, (160, 384, 384), k) >= 0.98
    assert _round_trip_iou(boxes, (160, 384, 384), 256) < 0.98  # why K is not smaller
