"""`reasonknee3d bench`: a smoke run on tiny sizes (figures present, positive, finite) and its helpers.

No timing thresholds: the figures depend on the machine, only their presence and sanity are checked.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from reasonknee3d import bench
from reasonknee3d.cli import main
from reasonknee3d.evaluation.score import score_files

HEADLINE = ("tokens_ratio", "train_step_speedup", "train_step_flops_ratio_real_size", "cache_speedup", "score_rate",
            "kv_cache_speedup", "mfu", "encoder_step_ratio", "encoder_flops_ratio_real_size")


def _positive_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.fixture
def one_thread():
    """Run torch on one thread: with two threads on two shared cores, tiny ops wait on the second thread
    whenever another job runs (measured: a tiny 3D step 0.06 s -> 1.9 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_quick_bench_cli_writes_every_figure(tmp_path, monkeypatch, capsys, one_thread):
    # The --quick settings, smaller still: one repeat, a few lines and tokens.
    monkeypatch.setattr(bench, "QUICK", replace(bench.QUICK, repeats=1, train_repeats=1, score_lines=150,
                                                gen_new_tokens=2, matmul_size=64))
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())

    assert result["quick"] is True
    for key in HEADLINE:
        assert _positive_finite(result[key]), (key, result[key])
    assert set(result["tokens_per_volume"]) == {"3d", "slice"}
    assert all(isinstance(n, int) and n > 0 for n in result["tokens_per_volume"].values())
    assert all(_positive_finite(t) for t in result["train_step_s"].values())
    assert set(result["goals"]) == set(bench.GOALS) and set(result["limits"]) >= set(HEADLINE)
    d = result["details"]
    # The processors' placeholder counts agree with what the configs predict.
    assert {k: d["tokens_per_volume"][k] for k in ("3d", "slice")} == d["tokens_per_volume"]["expected"]
    for family in ("3d", "slice"):
        step = d["train_step"][family]
        assert len(step["repeats_s"]) == 1 and _positive_finite(step["flops_per_step"])
        assert step["sequence_tokens"] == result["tokens_per_volume"][family] + d["train_step"]["text_tokens"][family]
    assert 0 < d["train_step"]["3d"]["encoder_share"] < 1
    assert d["score"]["settings"]["lines"] == 150
    enc = d["encoder_step"]
    assert set(result["encoder_step_s"]) == {"vit3d", "swin3d"} and len(enc["vit3d"]["repeats_s"]) == 1
    assert enc["settings"]["volume_shape"] == [32, 64, 64]
    assert result["encoder_step_ratio"] == enc["vit3d"]["median_s"] / enc["swin3d"]["median_s"]
    assert d["encoder_flops_real_size"]["vit3d"]["input_size"] == [32, 64, 64]  # tiny_3d's input: quick run
    assert "train_step_speedup" in capsys.readouterr().out  # the table was printed


def test_flop_counter_counts_cpu_attention_and_halves_causal():
    q = torch.randn(1, 2, 64, 16)
    counts = {}
    for causal in (False, True):
        with bench.flop_counter() as counter:
            F.scaled_dot_product_attention(q, q, q, is_causal=causal)
        counts[causal] = counter.get_total_flops()
    # Two (64 x 16) @ (16 x 64)-sized matmuls per head: 2 * (2 * 64 * 64 * 16) FLOPs per head, 2 heads.
    assert counts[False] == 2 * 2 * (2 * 64 * 64 * 16)
    assert counts[True] == counts[False] // 2


def test_generated_score_inputs_score_like_model_outputs(tmp_path):
    pred, ref = bench.write_score_inputs(69 * 3, tmp_path / "in")
    report = score_files(pred, ref, tmp_path / "report", plots=False)
    assert report["n"] == 69 * 3 and report["counts"]["missing_predictions"] == 0
    # 70 % right grades, boxes moved a little, 2 % prose without an answer (seeded: deterministic).
    assert 0.5 < report["overall"]["diag_exact"] < 0.95
    assert 0.2 < report["overall"]["miou"] < 0.95
    assert report["overall"]["parse_fail_severity"] < 0.1


def test_encoder_flops_grow_linearly_for_swin3d_and_faster_for_vit3d():
    # The real settings of the bench (vit3d of the real config, BenchSettings.swin3d), counted on the meta device
    # for the real volume and one twice as deep: window attention is linear in the patch count, full attention not.
    from reasonknee3d.families import load_experiment_config

    flops = {}
    for depth in (160, 320):
        exp = load_experiment_config("rk3d_qwen2.5vl_3b", [f"data.input_shape=[{depth}, 384, 384]"])
        flops[depth] = bench.count_encoder_flops_real_size(bench.encoder_configs(exp, bench.BENCH.swin3d))
    vit = flops[320]["vit3d"]["flops"] / flops[160]["vit3d"]["flops"]
    swin = flops[320]["swin3d"]["flops"] / flops[160]["swin3d"]["flops"]
    assert swin == pytest.approx(2.0, rel=0.01)
    assert vit > 3.0  # 2x the patches: 2x the projections and MLPs, 4x the attention matmuls
    assert flops[160]["ratio"] > 1
    # swin3d hands the projector 8 x 8 x 8 features, what vit3d's 16 x 24 x 24 patches pool to (2 x 3 x 3).
    assert flops[160]["swin3d"]["grid"] == [8, 8, 8] and flops[160]["vit3d"]["grid"] == [16, 24, 24]
    assert flops[160]["swin3d"]["first_stage_patches"] == 32 ** 3 and flops[160]["vit3d"]["first_stage_patches"] == 9216


def test_encoder_step_runs_under_autocast_and_says_where():
    from reasonknee3d.models.reasonknee3d.encoders import encoder_config

    size = [8, 16, 16]
    configs = {"vit3d": encoder_config(dict(encoder_type="vit3d", input_size=size, patch_size=[4, 8, 8], hidden_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
                                       strict=True),
               "swin3d": encoder_config(dict(encoder_type="swin3d", input_size=size, patch_size=[2, 4, 4], depths=[1, 1],
                                             num_heads=[1, 2], window_size=[4, 4, 4], hidden_size=16), strict=True)}
    out = bench.measure_encoder_step(configs, repeats=2, device="cpu", dtype=torch.bfloat16)
    assert out["settings"]["device"] == "cpu" and out["settings"]["dtype"] == "bfloat16"
    assert out["vit3d"]["device_peak_bytes"] is None  # peaks are read on CUDA only
    assert len(out["swin3d"]["repeats_s"]) == 2 and out["ratio"] == out["vit3d"]["median_s"] / out["swin3d"]["median_s"]
    assert "encoders on a CPU in bfloat16" in bench._encoder_limit(out)
