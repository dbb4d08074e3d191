"""`reasonknee3d bench --real-size`: the 3B shapes of the random-weight checkpoint, the FLOP count that goes beside
the measured step, the command's options, and (slow) one reduced end-to-end run."""
from __future__ import annotations

import json
import math

import pytest
import torch

from reasonknee3d import bench
from reasonknee3d.bench import real_size
from reasonknee3d.cli import main
from reasonknee3d.config import from_mapping
from reasonknee3d.models.tiny_qwen import (QWEN2_5_VL_3B_TEXT, QWEN2_5_VL_3B_VISION, TinyQwenSizes,
                                           build_tiny_qwen2_5_vl, qwen2_5_vl_3b_sizes)


def test_3b_sizes_are_the_real_shapes_unless_reduced():
    sizes = qwen2_5_vl_3b_sizes()
    s = from_mapping(TinyQwenSizes, sizes, "sizes")  # valid builder input
    t = QWEN2_5_VL_3B_TEXT
    assert (s.hidden_size, s.intermediate_size, s.num_hidden_layers, s.num_attention_heads, s.num_key_value_heads,
            s.vocab_rows, s.max_position_embeddings) == (2048, 11008, 36, 16, 2, 151936, 128000)
    assert (s.hidden_size, s.vocab_rows, s.num_hidden_layers) == (t["hidden_size"], t["vocab_size"],
                                                                  t["num_hidden_layers"])
    assert (s.vision_hidden_size, s.vision_intermediate_size, s.vision_depth, s.vision_num_heads,
            s.vision_fullatt_every, s.patch_size) == (1280, 3420, 32, 16, 8, 14)
    assert s.dtype == "bfloat16"
    small = from_mapping(TinyQwenSizes, qwen2_5_vl_3b_sizes(layers=2, vision_layers=3, width_divisor=4), "sizes")
    assert (small.num_hidden_layers, small.vision_depth, small.hidden_size, small.vision_hidden_size) == (2, 3, 512, 320)
    # Head dims stay the real ones, the embedding keeps every row.
    assert small.hidden_size // small.num_attention_heads == 128 and small.vocab_rows == 151936
    assert small.vision_hidden_size // small.vision_num_heads == QWEN2_5_VL_3B_VISION["vision_hidden_size"] // 16
    with pytest.raises(ValueError, match="width_divisor 3"):
        qwen2_5_vl_3b_sizes(width_divisor=3)
    with pytest.raises(ValueError, match="layers: expected >= 1"):
        qwen2_5_vl_3b_sizes(layers=0)


def test_builder_size_overrides_reach_the_checkpoint(tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig

    out = build_tiny_qwen2_5_vl(tmp_path / "ckpt", vocab_rows=2048, vision_depth=5, vision_fullatt_every=2,
                                dtype="bfloat16", bpe_vocab_size=300)
    config = AutoConfig.from_pretrained(out)
    assert config.text_config.vocab_size == 2048
    assert config.vision_config.fullatt_block_indexes == [1, 3, 4]  # every 2nd block and always the last
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
        rows = f.get_tensor(next(k for k in f.keys() if k.endswith("embed_tokens.weight"))).shape[0]
    assert dtypes == {torch.bfloat16} and rows == 2048
    with pytest.raises(ValueError, match="vocab_rows 64 is fewer than the tokenizer's"):
        build_tiny_qwen2_5_vl(tmp_path / "small", vocab_rows=64, bpe_vocab_size=300)
    with pytest.raises(ValueError, match="dtype 'float64'"):
        TinyQwenSizes(dtype="float64")


def test_flop_count_with_answer_logits_only_drops_exactly_the_cut_lm_head_work():
    from reasonknee3d.families import load_experiment_config

    exp = load_experiment_config("tiny_3d")
    text = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                         "mrope_section": [2, 3, 3]})
    visual = {"3d": 40, "slice": 100}
    full = bench.count_real_size_flops(exp, text, visual, text_tokens=30)
    cut = bench.count_real_size_flops(exp, text, visual, text_tokens=30, logit_tokens=10)
    for key in ("3d", "slice"):
        n = visual[key] + 30
        # lm_head (frozen): forward 2*k*h*V, input gradient 2*k*h*V, for k = n positions vs 10.
        assert full[f"{key}_flops"] - cut[f"{key}_flops"] == 4 * (n - 10) * 64 * 1000
    assert cut["settings"]["logit_tokens"] == 10 and full["settings"]["logit_tokens"] is None


@pytest.mark.parametrize("argv,message", [
    (["--layers", "1"], "--layers needs --real-size"),
    (["--real-size", "--scale", "3"], "--scale must be 1, 2 or 4"),
    (["--real-size", "--layers", "0"], "--layers must be >= 1"),
    (["--real-size", "--quick"], "--quick and --repeats do not apply"),
    (["--volume-grouping", "4"], "--volume-grouping needs --real-size"),
    (["--real-size", "--volume-grouping", "0"], "--volume-grouping must be >= 1"),
])
def test_real_size_options_are_checked_before_anything_runs(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(real_size, "run_real_size_bench", lambda *a, **k: pytest.fail("ran"))
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def test_release_questions_fill_whole_volume_groups():
    s = real_size.RealSizeSettings()
    assert s.release_questions() == [1, 30]
    four = real_size.RealSizeSettings(volume_grouping=4).release_questions()
    assert four[:2] == [1, 30] and len(four) == 4 == len(set(four))
    assert len(real_size.RealSizeSettings(questions=(1, 30, 2), volume_grouping=2).release_questions()) == 4


@pytest.mark.slow  # builds a 151,936-row checkpoint, preprocesses, trains and predicts with both presets: minutes
def test_real_size_bench_one_layer_reduced_width(tmp_path, monkeypatch, capsys):
    from transformers import AutoConfig

    monkeypatch.setenv("REASONKNEE3D_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "real.json"
    assert main(["bench", "--real-size", "--layers", "1", "--scale", "4", "--volume-grouping", "4",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    r = result["real_size"]
    assert r["settings"]["volume_grouping"] == 4 and len(r["release"]["questions"]) == 4  # 1, 30 and two more
    g = r["3d"]["train_grouped"]
    assert (g["volume_grouping"], g["batch_size"], g["distinct_volumes"]) == (4, 4, 1)
    assert _positive(g["median_step_s"]) and g["per_sample_s"] == pytest.approx(g["median_step_s"] / 4)
    per = r["per_sample"]
    assert set(per["3d_s"]) == set(per["slice_over_3d"]) == {"1", "4"}
    assert per["3d_s"]["1"] == r["3d"]["train"]["median_step_s"] and per["3d_s"]["4"] == g["per_sample_s"]
    assert per["slice_over_3d"]["4"] == pytest.approx(per["slice_s"] / g["per_sample_s"])
    assert r["settings"]["layers"] == 1 and r["settings"]["width_divisor"] == 4 and not r["settings"]["true_shapes"]
    ckpt = AutoConfig.from_pretrained(r["checkpoint"]["path"])
    assert (ckpt.text_config.vocab_size, ckpt.text_config.hidden_size, ckpt.text_config.num_hidden_layers) == (
        151936, 512, 1)
    assert (ckpt.vision_config.depth, ckpt.vision_config.hidden_size, ckpt.vision_config.out_hidden_size) == (1, 320, 512)
    assert r["checkpoint"]["reused"] is False and r["settings"]["encoder_3d"]["num_hidden_layers"] == 1
    assert r["settings"]["encoder_3d"]["hidden_size"] == 192
    for key, visual in (("3d", 512), ("slice", 5120)):  # the real presets' visual tokens at 160 x 384 x 384
        f = r[key]
        assert f["preprocess"]["volumes"] == 2 and _positive(f["preprocess"]["seconds"])
        t = f["train"]
        assert t["visual_tokens"] == visual and t["tokens_per_sample"] == visual + t["text_tokens"]
        assert len(t["steps_s"]) == 1 and all(_positive(v) for v in (t["median_step_s"], t["flops_per_step_causal"],
                                                                     t["achieved_flops_per_s"], t["loss"]))
        assert 0 < t["answer_tokens"] < t["logit_tokens"] < t["tokens_per_sample"]
        assert t["trainable_parameters"] < t["parameters"]
        for phase in ("preprocess", "train", "predict"):
            assert _positive(f[phase]["host_peak_rss_bytes"])
            assert (f[phase]["device_peak_bytes"] is None) == (not torch.cuda.is_available())
        assert f["predict"]["samples"] == 1 and _positive(f["predict"]["seconds"])
    printed = capsys.readouterr().out
    assert "train step" in printed
    assert all(row in printed for row in ("3D per sample (G=1)", "3D per sample (G=4)", "slice per sample"))


def test_a_failing_family_leaves_the_finished_one_on_disk(tmp_path, monkeypatch):
    """The slice preset failed on a GPU after the 3D preset had run for minutes: those numbers stay in --out."""
    from reasonknee3d.data import synth
    from reasonknee3d.models.tiny_qwen import default_tiny_qwen_dir

    lm_dir = default_tiny_qwen_dir(tmp_path / "lm")
    monkeypatch.setattr(real_size, "real_size_checkpoint", lambda s: (lm_dir, {"path": str(lm_dir)}))
    monkeypatch.setattr(synth, "write_synthetic_release", lambda *a, **k: None)

    def run_family(s, name, lm, release, work):
        if name == s.config_slice:
            raise RuntimeError("slice failed")
        return None, {"train": {"median_step_s": 1.5}}

    monkeypatch.setattr(real_size, "_run_family", run_family)
    out = tmp_path / "real.json"
    with pytest.raises(RuntimeError, match="slice failed"):
        real_size.run_real_size_bench(out, work_dir=tmp_path / "work")
    r = json.loads(out.read_text())["real_size"]
    assert r["partial"] is True and r["3d"]["train"]["median_step_s"] == 1.5 and "slice" not in r
