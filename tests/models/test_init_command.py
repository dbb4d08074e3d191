"""`reasonknee3d init`: an untrained model directory from an experiment YAML, loadable by the Auto classes."""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoProcessor

from reasonknee3d.cli import main

import reasonknee3d

PRESETS = Path(reasonknee3d.__file__).parent / "configs"

TINY = PRESETS / "tiny_3d.yaml"


def test_init_tiny_3d_writes_a_loadable_directory(tmp_path, capsys):
    out = tmp_path / "rk3d"
    assert main(["init", "--config", str(TINY), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    cfg = yaml.safe_load(TINY.read_text())
    assert processor.volume_size == cfg["data"]["input_shape"]
    assert processor.num_visual_tokens == model.config.num_visual_tokens == 128
    assert processor.num_bins == model.config.num_bins == cfg["model"]["num_bins"]
    assert processor.preprocess["normalization"] == "zscore"
    batch = processor(torch.randn(1, 1, *cfg["data"]["input_shape"]), ["Where is the lesion?"],
                      answers=["Final diagnosis: {}"])
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_init_rejects_unknown_families_and_bad_model_sections(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: 2d\n")
    assert main(["init", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "family: unknown model family '2d'; expected one of ['3d', 'slice']" in capsys.readouterr().err
    raw = yaml.safe_load(TINY.read_text())
    # 8 depth patches are not divisible by 3
    raw["model"]["projector"] = {"projector_type": "pool3d_mlp", "pool_kernel": [3, 2, 2]}
    bad.write_text(yaml.safe_dump(raw))
    assert main(["init", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "not divisible by pool_kernel" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_init_goes_through_the_family_registry(tmp_path, monkeypatch, capsys):
    from reasonknee3d.families.slice import SliceFamily
    seen = {}
    monkeypatch.setattr(SliceFamily, "init", lambda self, exp, out, overwrite=False: seen.update(exp=exp, out=out) or Path(out))
    assert main(["init", "--config", "tiny_slice", "--out", str(tmp_path / "s"), "model.num_frames=8"]) == 0
    assert seen["exp"].family == "slice" and seen["exp"].model.num_frames == 8 and seen["out"] == tmp_path / "s"
