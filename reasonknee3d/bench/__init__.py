"""`reasonknee3d bench`: the package's performance claims, measured in one run on this machine.

Every figure is a ratio or rate measured here, in this process, beside the settings that produced it:

- ``tokens_per_volume`` / ``tokens_ratio``: language-model tokens for one 160 x 384 x 384 volume, counted in
  the ``input_ids`` that each family's processor writes for the real-size configs (3D-native
  ``ReasonKnee3DProcessor``; the slice baseline's stock Qwen2.5-VL processor on 160 frames).
- ``train_step_speedup``: forward + backward + optimizer step of the 3D-native model over the slice baseline
  on cached vision features, with the same language model and text, each family at its own visual token
  count and with its config's trainable parts (LoRA, new token rows). A CPU cannot run the real 3B language
  model or the real ViT-B over 9,216 patches in seconds, so the measured step uses the small ``BenchSettings``
  sizes; ``train_step_flops_ratio_real_size`` is the FLOP ratio of the real-size steps, counted on the meta
  device (details: ``train_step_flops_real_size``).
- ``cache_speedup``: cached volume load over NIfTI load + preprocessing (``data.cache.bench_cache``).
- ``score_rate``: references scored per second by ``score_files`` on a generated 100k-line pair.
- ``kv_cache_speedup``: greedy generation tokens/s of the tiny 3D model with and without the KV cache.
- ``encoder_step_ratio``: forward + backward time of the 3D config's ``vit3d`` encoder over a ``swin3d`` encoder
  (``BenchSettings.swin3d``) on the same volume, both at reduced width and depth (``encoder_step_reduce``);
  ``encoder_flops_ratio_real_size`` is their FLOP ratio at full size, counted on the meta device.
- ``mfu``: FLOPs of the measured 3D training step (``FlopCounterMode``) per second, over the fp32 matmul
  peak measured in the same run.

``real_size.run_real_size_bench`` (``bench --real-size``) runs instead the real presets end to end at the true sizes
(preprocess, training steps through ``run_training``, a short ``predict``) on a random-weight checkpoint of
Qwen2.5-VL-3B's shapes, and reports time, peak memory, tokens per sample and counted FLOPs in a ``real_size``
section (``print_real_size_table``).

Each ``measure_*`` function returns a dict with the median, every repeat and its settings; ``run_bench``
runs them all and ``print_table`` shows the result. Timed figures are medians after a warm-up run; the
two sides of a speedup are timed in alternation.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ..io_utils import write_json, write_jsonl
from ..models.tiny_qwen import QWEN2_5_VL_3B_TEXT

logger = logging.getLogger(__name__)

GOALS = {"tokens_ratio": 10.0, "train_step_speedup": 3.0, "cache_speedup": 50.0}
"""Targets of the issue that asked for this benchmark (figure >= goal)."""


@dataclass(frozen=True)
class BenchSettings:
    """What ``run_bench`` measures with. ``BENCH`` is the default run, ``QUICK`` a smoke run on tiny sizes."""

    config_3d: str = "rk3d_qwen2.5vl_3b"
    """3D-native experiment (a preset name or a file): token count, encoder geometry, trainable parts."""
    config_slice: str = "slice_qwen2.5vl_3b"
    """Slice-baseline experiment: frames, frame size, pixel limits, trainable parts."""
    volume_shape: tuple[int, int, int] = (160, 384, 384)
    """Synthetic volume (S, H, W) fed to both processors and to the 3D training step."""
    lm: dict = field(default_factory=lambda: dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2))
    """Sizes (``tiny_qwen.TinyQwenSizes``) of the random-init language model both families train with.
    Real: hidden 2048, 36 layers. On 2 idle CPU cores a slice step over about 5,400 tokens takes about 2 s
    at these sizes; hidden 512 x 4 layers took about 20 s with another job on the cores."""
    encoder: dict = field(default_factory=lambda: dict(patch_size=[20, 48, 48], hidden_size=96, num_hidden_layers=1,
                                                        num_attention_heads=2, intermediate_size=384))
    """Overrides of the 3D config's ``model.encoder`` for the measured step. Width and depth shrink like the
    LM's (real ViT-B: 768 = 0.375 x 2048 wide, 12 = 36 / 3 layers), which keeps the encoder's share of the
    3D step's FLOPs near the real one. Patch 20 x 48 x 48 without pooling gives the real 8 x 8 x 8 = 512
    visual tokens from the same 160 x 384 x 384 input, but attends over 512 patches instead of 9,216: CPU
    SDPA backward over 9,216 tokens alone takes seconds to tens of seconds here."""
    projector: dict = field(default_factory=lambda: dict(pool_kernel=[1, 1, 1]))
    """Overrides of the 3D config's ``model.projector`` that go with ``encoder``."""
    question_id: int = 1
    """Question whose prompt and templated answer make the text of every training sample."""
    real_text_config: Optional[dict] = field(default_factory=lambda: dict(QWEN2_5_VL_3B_TEXT))
    """Language model of the real-size FLOP count (None: the bench language model's)."""
    gen_config: str = "tiny_3d"
    """3D model whose generation is timed with and without the KV cache."""
    gen_new_tokens: int = 64
    """Tokens generated per timed ``generate`` call."""
    score_lines: int = 100_000
    """References (and predictions) in the generated scoring pair."""
    matmul_size: int = 2048
    """n of the n x n fp32 ``torch.mm`` whose FLOP/s is the machine's peak."""
    repeats: int = 5
    """Timed runs per figure (after one warm-up run)."""
    train_repeats: int = 3
    """Timed training steps per family (a slice step takes seconds on a CPU)."""
    swin3d: dict = field(default_factory=lambda: dict(
        encoder_type="swin3d", patch_size=[5, 12, 12], depths=[2, 10], num_heads=[6, 12], window_size=[8, 8, 8],
        hidden_size=768))
    """The swin3d encoder compared with the 3D config's vit3d, at the 3D config's input size. Patch 5 x 12 x 12
    voxels (3.5 x 4.4 x 4.4 mm) -> a 32 x 32 x 32 first stage (32,768 patches, 3.6x the vit3d's 9,216) in
    windows of 8^3, one merging per stage -> 8 x 8 x 8 = 512 features of width 768: the vit3d's token count
    and projector width without pooling. 12 blocks (2 + 10) like the ViT-B's."""
    encoder_step_reduce: dict = field(default_factory=lambda: {
        "vit3d": dict(hidden_size=96, num_hidden_layers=1, num_attention_heads=2, intermediate_size=384),
        "swin3d": dict(hidden_size=96, depths=[1, 1], num_heads=[1, 2])})
    """Overrides of each encoder for the timed CPU step: width and depth shrink, the patch geometry (hence the
    number of patches each attends over) stays that of the real settings."""


BENCH = BenchSettings()
QUICK = BenchSettings(config_3d="tiny_3d", config_slice="tiny_slice", volume_shape=(32, 64, 64),
                      lm={}, encoder={}, projector={}, gen_new_tokens=8, score_lines=2000, matmul_size=256,
                      repeats=2, train_repeats=2, real_text_config=None,
                      swin3d=dict(encoder_type="swin3d", patch_size=[2, 4, 4], depths=[1, 1], num_heads=[1, 2],
                                  window_size=[4, 4, 4], hidden_size=64),
                      encoder_step_reduce={"vit3d": {}, "swin3d": {}})


# --- timing and FLOP counting ------------------------------------------------------------------------

def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call, per name: ``warmup`` untimed rounds, then ``repeats`` rounds calling every
    function once in turn. Interleaving makes a burst of load from other jobs hit both sides of a ratio
    instead of only the one being timed at that moment."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def time_runs(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    return time_interleaved({"fn": fn}, repeats, warmup)["fn"]


def _cpu_sdpa_flop(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int],
                   dropout_p: float = 0.0, is_causal: bool = False, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    # PyTorch's CPU flash kernel skips the key blocks above the diagonal of a causal mask: half the work.
    return sdpa_flop_count(query_shape, key_shape, value_shape) // (2 if is_causal else 1)


def _cpu_sdpa_backward_flop(grad_out_shape: Sequence[int], query_shape: Sequence[int], key_shape: Sequence[int],
                            value_shape: Sequence[int], _out: Any = None, _logsumexp: Any = None,
                            dropout_p: float = 0.0, is_causal: bool = False, *args: Any, out_shape: Any = None,
                            **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape) // (2 if is_causal else 1)


def flop_counter() -> Any:
    """``FlopCounterMode`` that also counts the CPU flash-attention kernel (torch counts only the GPU ones)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop})


def measure_matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """FLOP/s of an ``n x n`` fp32 ``torch.mm`` on this machine; ``peak_flops`` is the fastest run."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    times = time_runs(lambda: torch.mm(a, b), repeats)
    flops = 2 * n ** 3
    return {"peak_flops": flops / min(times), "median_flops": flops / statistics.median(times), "repeats_s": times,
            "settings": {"n": n, "dtype": "float32", "threads": torch.get_num_threads()}}


# --- the two families, built the way the trainer builds them ------------------------------------------

def _overrides(prefix: str, values: dict[str, Any]) -> list[str]:
    # JSON-quoted: YAML reads JSON, and a path stays a string.
    return [f"{prefix}.{k}={json.dumps(v)}" for k, v in values.items()]


def load_experiments(s: BenchSettings, lm_dir: Optional[Path] = None) -> tuple[Any, Any]:
    """(3D, slice) ``ExperimentConfig`` of ``s``; with ``lm_dir``, as measured on this machine: both on that
    language model, in fp32, the 3D encoder with ``s.encoder`` / ``s.projector`` overrides."""
    from ..families import load_experiment_config

    if lm_dir is None:
        return load_experiment_config(s.config_3d), load_experiment_config(s.config_slice)
    common = [f"model.language_model={json.dumps({'path': str(lm_dir)})}"]
    encoder = _overrides("model.encoder", s.encoder) + _overrides("model.projector", s.projector)
    exp3d = load_experiment_config(s.config_3d, common + ["model.dtype=null"] + encoder)
    exp_slice = load_experiment_config(s.config_slice, common + ['model.dtype="float32"'])
    return exp3d, exp_slice


def synthetic_volume(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """Random DESS-range intensities (0-999) as float32 ``(S, H, W)``: token counts and step costs do not
    depend on image content, so no phantom is rendered."""
    return np.random.default_rng(seed).integers(0, 1000, tuple(shape)).astype(np.float32)


def _text(question_id: int, shape: Sequence[int]) -> tuple[str, str]:
    """(prompt, answer) of one sample: the synthetic release's wording and templated answer, whose box
    covers the middle of a volume of ``shape``."""
    from ..answer import format_answer
    from ..prompts import question_prompt, reasoning_steps
    from ..schema import get_question

    spec = get_question(question_id)
    severity = {f.key: f.grades[-1] for f in spec.fields}
    box = [int(n * f) for n in shape for f in (0.4, 0.6)]
    return question_prompt(spec), format_answer(spec, reasoning_steps(spec, severity), box, severity)


# --- tokens per volume --------------------------------------------------------------------------------

def measure_tokens_per_volume(exp3d: Any, exp_slice: Any, lm_dir: Path, volume: np.ndarray,
                              prompt: str) -> dict[str, Any]:
    """Visual tokens of ``volume`` in the ``input_ids`` each family's processor writes for ``prompt``
    (``Family.processor_visual_tokens``), beside the count each family derives from its config alone.
    Only tokenizer and processor files of ``lm_dir`` are read."""
    from ..families import get_family

    counted, expected = {}, {}
    for name, exp in (("3d", exp3d), ("slice", exp_slice)):
        family = get_family(exp.family)
        counted[name] = family.processor_visual_tokens(exp, lm_dir, volume, prompt)
        expected[name] = family.num_visual_tokens(exp, volume.shape)
    return {**counted, "ratio": counted["slice"] / counted["3d"],
            "settings": {"volume_shape": list(volume.shape), "volume": "random intensities 0-999",
                         "config_3d": exp3d.source, "config_slice": exp_slice.source,
                         "encoder": exp3d.model.encoder, "projector": exp3d.model.projector,
                         "frame_size": list(exp_slice.model.frame_size)},
            "expected": expected}


# --- training step ------------------------------------------------------------------------------------

def _trainable(exp: Any) -> tuple[Any, Any, torch.optim.Optimizer]:
    """(model to train, processor, AdamW) built and set up exactly as ``run_training`` does."""
    from ..families import get_family
    from ..training.stages import setup_trainable

    family = get_family(exp.family)
    torch.manual_seed(0)
    model, processor = family.build(exp, "sdpa")
    model = setup_trainable(model, exp.train, family.module_paths(model), family.new_token_ids(model, processor))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, processor, torch.optim.AdamW(params, lr=exp.train.learning_rate,
                                               weight_decay=exp.train.weight_decay)


def _step(model: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> float:
    from ..training.losses import answer_logits_only

    # The trainer's step: logits only over the answer columns.
    loss = model(**answer_logits_only(batch)).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _family_step(exp: Any, volume: np.ndarray, prompt: str,
                 answer: str) -> tuple[Any, torch.optim.Optimizer, dict[str, Any]]:
    """(model, optimizer, one-sample batch) of one experiment's family, ready for ``_step``."""
    from ..families import get_family
    model, processor, optimizer = _trainable(exp)
    return model, optimizer, get_family(exp.family).example_batch(model, processor, volume, prompt, answer)


def _step_counts(model: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any], name: str) -> dict[str, Any]:
    """FLOPs of one step, token and parameter counts; for the 3D family also ``encoder_flops`` (forward +
    backward of encoder and projector alone) and their share of the step."""
    from ..training.stages import unwrap_base

    with flop_counter() as counter:
        loss = _step(model, optimizer, batch)
    if not math.isfinite(loss):
        raise RuntimeError(f"{name} bench step gave loss {loss}; the step is not a real training step")
    out = {"flops_per_step": counter.get_total_flops(), "sequence_tokens": int(batch["input_ids"].shape[1]),
           "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "parameters": sum(p.numel() for p in model.parameters())}
    if "volumes" in batch:
        # FlopCounterMode's per-module split is unreliable in backward, so the encoder is counted on its own.
        with flop_counter() as counter:
            unwrap_base(model).model.get_volume_features(batch["volumes"]).sum().backward()
        optimizer.zero_grad(set_to_none=True)
        out["encoder_flops"] = counter.get_total_flops()
        out["encoder_share"] = out["encoder_flops"] / out["flops_per_step"]
    return out


def measure_train_step(exp3d: Any, exp_slice: Any, volume: np.ndarray, question_id: int, prompt: str, answer: str,
                       visual_tokens: dict[str, int], repeats: int = 3) -> dict[str, Any]:
    """Training step time of both families on one sample: forward + backward + AdamW step, batch size 1,
    the two families' steps interleaved.

    3D: volume -> encoder -> projector -> language model. Slice: the same language model on cached vision
    features (``mm_encoder_outputs``), as in training. Trainable parts come from each config's ``train:``
    (``training.stages.setup_trainable``). ``visual_tokens`` (``measure_tokens_per_volume``) gives the text
    token count: sequence length minus visual tokens.
    """
    setups = {"3d": _family_step(exp3d, volume, prompt, answer), "slice": _family_step(exp_slice, volume, prompt, answer)}
    times = time_interleaved({name: functools.partial(_step, *setup) for name, setup in setups.items()}, repeats)
    r3d, rsl = ({"median_s": statistics.median(times[name]), "repeats_s": times[name],
                 **_step_counts(*setups[name], name)} for name in ("3d", "slice"))
    text = {name: r["sequence_tokens"] - visual_tokens[name] for name, r in (("3d", r3d), ("slice", rsl))}
    return {"speedup": rsl["median_s"] / r3d["median_s"], "flops_ratio": rsl["flops_per_step"] / r3d["flops_per_step"],
            "3d": r3d, "slice": rsl, "text_tokens": text,
            "settings": {"config_3d": exp3d.source, "config_slice": exp_slice.source,
                         "language_model": _lm_summary(exp3d), "encoder": dict(exp3d.model.encoder),
                         "projector": dict(exp3d.model.projector), "batch_size": 1, "dtype": "float32",
                         "attn_implementation": "sdpa", "activation_checkpointing": False,
                         "train_3d": exp3d.train.modes(), "train_slice": exp_slice.train.modes(),
                         "lora_r": exp3d.train.lora.r, "repeats": repeats}}


def _lm_summary(exp: Any) -> dict[str, Any]:
    from transformers import AutoConfig
    text = AutoConfig.from_pretrained(exp.model.language_model["path"]).text_config
    return {k: getattr(text, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "vocab_size")}


def count_real_size_flops(exp3d_real: Any, text_config: dict[str, Any], visual_tokens: dict[str, int],
                          text_tokens: int, logit_tokens: Optional[int] = None) -> dict[str, Any]:
    """FLOPs of one real-size training step of each family, counted on the meta device (nothing computed).

    3D: encoder + projector forward and backward (they train in full) on a volume of the config's input
    size, plus the language model on ``visual_tokens["3d"] + text_tokens`` tokens. Slice: the language model
    on ``visual_tokens["slice"] + text_tokens`` (the vision tower is cached). The language model is frozen
    (LoRA r=16 adds under 1 %), its backward computes input gradients only. On the meta device attention
    runs as plain matmuls over the full causal square; ``*_causal`` halve the language model's attention
    matmuls, as flash-attention kernels do. Activation checkpointing (one more forward) is not counted.
    ``logit_tokens``: positions that get logits (the trainer's ``answer_logits_only`` keeps the answer's);
    None: every position.
    """
    from ..models.reasonknee3d.configuration_reasonknee3d import ReasonKnee3DConfig
    from ..models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration

    kw = exp3d_real.model.from_qwen_kwargs(exp3d_real.data.input_shape)
    config = ReasonKnee3DConfig(encoder_config=kw["encoder_config"], projector_config=kw["projector_config"],
                                text_config=text_config, num_bins=kw["num_bins"], volume_token_id=0)
    with torch.device("meta"):
        model = ReasonKnee3DForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    model.model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)

    with flop_counter() as counter:
        features = model.model.get_volume_features(torch.empty(1, 1, *config.encoder_config.input_size, device="meta"))
        features.sum().backward()
    encoder = counter.get_total_flops()

    def lm_flops(n: int) -> tuple[int, int]:
        """(all FLOPs, attention-matmul FLOPs) of the language model's forward + backward over n tokens."""
        hidden = torch.empty(1, n, config.text_config.hidden_size, device="meta", requires_grad=True)
        positions = torch.arange(n).expand(3, 1, n).to("meta")
        with flop_counter() as c:
            out = model.model.language_model(inputs_embeds=hidden, position_ids=positions).last_hidden_state
            k = n if logit_tokens is None else min(logit_tokens, n)
            logits = model.lm_head(out[:, -k:]).float()
            torch.nn.functional.cross_entropy(logits.view(k, -1), torch.zeros(k, dtype=torch.long, device="meta")
                                              ).backward()
        # Every batched matmul of the language model is attention (projections are mm / addmm).
        return c.get_total_flops(), c.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0)

    lm3d, att3d = lm_flops(visual_tokens["3d"] + text_tokens)
    lmsl, attsl = lm_flops(visual_tokens["slice"] + text_tokens)
    f3d, fsl = encoder + lm3d, lmsl
    f3d_c, fsl_c = f3d - att3d // 2, fsl - attsl // 2
    return {"ratio": fsl / f3d, "ratio_causal": fsl_c / f3d_c, "3d_flops": f3d, "slice_flops": fsl,
            "3d_flops_causal": f3d_c, "slice_flops_causal": fsl_c, "encoder_flops": encoder,
            "encoder_share_3d": encoder / f3d_c,
            "settings": {"config_3d": exp3d_real.source, "encoder": kw["encoder_config"].to_diff_dict(),
                         "projector": kw["projector_config"].to_diff_dict(), "language_model": text_config,
                         "tokens": {"3d": visual_tokens["3d"] + text_tokens,
                                    "slice": visual_tokens["slice"] + text_tokens},
                         "logit_tokens": logit_tokens}}


# --- encoders: vit3d against swin3d ------------------------------------------------------------------

def encoder_configs(exp3d: Any, swin3d: dict[str, Any], reduce: Optional[dict[str, dict]] = None) -> dict[str, Any]:
    """``{"vit3d": ..., "swin3d": ...}`` encoder configs at ``exp3d``'s input size: the experiment's own encoder
    and ``swin3d``, each with ``reduce[name]`` on top (sizes only; the patch geometry stays)."""
    from ..models.reasonknee3d.encoders import encoder_config

    reduce = reduce or {}
    size = [int(v) for v in exp3d.data.input_shape]
    out = {}
    for name, settings in (("vit3d", dict(exp3d.model.encoder)), ("swin3d", dict(swin3d))):
        settings = {**settings, **reduce.get(name, {}), "input_size": size}
        config = encoder_config(settings, strict=True)
        if config.encoder_type != name:
            raise ValueError(f"bench: the {name} side is a {config.encoder_type!r} encoder ({exp3d.source})")
        out[name] = config
    return out


def encoder_step_flops(config: Any) -> int:
    """FLOPs of one forward + backward of a freshly built encoder of ``config`` on one volume of its input size,
    counted on the meta device (nothing is computed or allocated)."""
    from ..models.reasonknee3d.encoders import build_encoder

    with torch.device("meta"):
        encoder = build_encoder(config)
    encoder.train()
    with flop_counter() as counter:
        features, _ = encoder(torch.empty(1, config.in_channels, *config.input_size, device="meta"))
        features.float().pow(2).mean().backward()
    return counter.get_total_flops()


def _encoder_summary(config: Any) -> dict[str, Any]:
    first = [s // p for s, p in zip(config.input_size, config.patch_size)]  # patches of the first layer
    return {"input_size": list(config.input_size), "grid": list(config.grid_size), "features": math.prod(config.grid_size), "first_stage_patches":
            math.prod(first), "settings": config.to_diff_dict()}


def measure_encoder_step(configs: dict[str, Any], repeats: int = 3, seed: int = 0, device: Optional[str] = None,
                         dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Forward + backward time of each encoder in ``configs`` (name -> encoder config, same input size) on one
    random volume, the encoders timed in alternation; ``ratio`` = vit3d median over swin3d median.

    The backward runs from the mean square of the features, so every parameter gets a gradient; gradients are
    dropped between runs. Also counts each step's FLOPs (meta device). ``device`` (default CPU): where the
    encoders run; on CUDA each step ends with a synchronize so the wall time covers the kernels, and the peak
    device memory of each encoder's steps is reported. ``dtype`` other than float32 runs the forward under
    autocast (the weights stay float32, as in mixed-precision training).
    """
    from ..models.reasonknee3d.encoders import build_encoder

    sizes = {tuple(c.input_size) for c in configs.values()}
    if len(sizes) != 1:
        raise ValueError(f"measure_encoder_step: the encoders have different input sizes {sorted(sizes)}")
    dev = torch.device(device or "cpu")
    cuda = dev.type == "cuda"
    volume = torch.randn(1, 1, *sizes.pop(), generator=torch.Generator().manual_seed(seed)).to(dev)
    encoders = {}
    for name, config in configs.items():
        torch.manual_seed(seed)
        encoders[name] = build_encoder(config).to(dev).train()
    peaks: dict[str, int] = {}

    def step(name: str) -> None:
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            features, _ = encoders[name](volume)
        features.float().pow(2).mean().backward()
        encoders[name].zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(dev)
            peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(dev))

    times = time_interleaved({name: functools.partial(step, name) for name in encoders}, repeats)
    out: dict[str, Any] = {}
    for name, config in configs.items():
        out[name] = {"median_s": statistics.median(times[name]), "repeats_s": times[name],
                     "flops": encoder_step_flops(config), "device_peak_bytes": peaks.get(name),
                     "parameters": sum(p.numel() for p in encoders[name].parameters()), **_encoder_summary(config)}
    return {"ratio": out["vit3d"]["median_s"] / out["swin3d"]["median_s"],
            "flops_ratio": out["vit3d"]["flops"] / out["swin3d"]["flops"], **out,
            "settings": {"volume_shape": list(volume.shape[2:]), "batch_size": 1, "device": str(dev),
                         "dtype": str(dtype).removeprefix("torch."),
                         "attn_implementation": "sdpa (vit3d); MONAI window attention (swin3d)",
                         "activation_checkpointing": False, "repeats": repeats}}


def count_encoder_flops_real_size(configs: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one forward + backward of each full-size encoder (meta device); ``ratio`` = vit3d over swin3d."""
    out = {name: {"flops": encoder_step_flops(config), **_encoder_summary(config)} for name, config in configs.items()}
    return {"ratio": out["vit3d"]["flops"] / out["swin3d"]["flops"], **out}


# --- cache, scoring, generation -----------------------------------------------------------------------

def measure_cache(exp3d_real: Any, work_dir: Path, repeats: int = 5) -> dict[str, Any]:
    """``data.cache.bench_cache`` with the 3D config's preprocessing on a volume of its input size."""
    from ..data.cache import bench_cache

    r = bench_cache(work_dir, shape=tuple(exp3d_real.data.input_shape), cfg=exp3d_real.data, repeats=repeats)
    return {"speedup": r["ratio"], "nifti_load_preprocess_s": r["nifti_load_preprocess_s"],
            "cache_load_s": r["cache_load_s"],
            "settings": {"config": exp3d_real.source, "shape": r["shape"], "input_shape": r["input_shape"],
                         "repeats": r["repeats"], "volume": "random int16 NIfTI (.nii.gz)",
                         "cache_read": "float16 .npy -> in-memory float16 tensor (VolumeCache.read_tensor, what "
                                       "the Dataset does; the model casts on its device)"}}


def write_score_inputs(n_lines: int, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """A references + predictions pair of ``n_lines`` (volume, question) lines, as models write them.

    Every question in turn, grades drawn like the synthetic release's; predictions get the right grades
    70 % of the time and the true box moved by up to 8 voxels per coordinate. 90 % of outputs are in the
    package's answer format, 8 % zero-shot style JSON in a code fence, 2 % prose without an answer.
    """
    from ..answer import format_answer
    from ..boxes import clip_boxes, repair_boxes
    from ..data.synth import sample_severity
    from ..prompts import reasoning_steps
    from ..schema import load_schema

    rng = np.random.default_rng(seed)
    schema = load_schema()
    qids = sorted(schema)
    shape = np.array([160, 384, 384])
    # Boxes and the draws that pick each output's kind are made for all lines at once: per-line numpy calls
    # would make writing the inputs slower than scoring them.
    lo = rng.integers(0, shape - 40, (n_lines, 3))
    # (N, 3, 2) -> (N, 6): per axis min then max, the package's box order.
    boxes = np.stack([lo, lo + rng.integers(8, 40, (n_lines, 3))], axis=2).reshape(n_lines, 6)
    guess_boxes = clip_boxes(repair_boxes(boxes + rng.integers(-8, 9, (n_lines, 6)))[0], shape).astype(int).tolist()
    right, kind = rng.random(n_lines) < 0.7, rng.random(n_lines)
    refs, preds = [], []
    for i, (box, guess_box) in enumerate(zip(boxes.tolist(), guess_boxes)):
        spec = schema[qids[i % len(qids)]]
        truth = sample_severity(spec, rng)
        guess = truth if right[i] else sample_severity(spec, rng)
        sid = f"bench{i // len(qids):05d}:q{spec.question_id}"
        refs.append({"sample_id": sid, "volume_id": sid.split(":")[0], "question_id": spec.question_id,
                     "severity": truth, "box": box, "split": "test"})
        if kind[i] < 0.9:
            output = format_answer(spec, reasoning_steps(spec, guess), guess_box, guess)
        elif kind[i] < 0.98:
            output = ("Here is my assessment.\n```json\n"
                      + json.dumps({"box": guess_box, spec.wrapper: {spec.finding_key: guess}}) + "\n```")
        else:
            output = "The image quality does not allow an assessment."
        preds.append({"sample_id": sid, "output": output})
    out_dir.mkdir(parents=True, exist_ok=True)
    ref_path, pred_path = out_dir / "references.jsonl", out_dir / "predictions.jsonl"
    write_jsonl(ref_path, refs)
    write_jsonl(pred_path, preds)
    return pred_path, ref_path


def measure_score_rate(n_lines: int, work_dir: Path, repeats: int = 3) -> dict[str, Any]:
    """References scored per second by ``score_files`` (read, parse, score, write the report; no plots)."""
    from ..evaluation.score import score_files

    pred, ref = write_score_inputs(n_lines, work_dir)
    report: dict[str, Any] = {}

    def run() -> None:
        report.update(score_files(pred, ref, work_dir / "report", plots=False))
    times = time_runs(run, repeats)
    return {"lines_per_s": n_lines / statistics.median(times), "median_s": statistics.median(times),
            "repeats_s": times,
            "settings": {"lines": n_lines, "plots": False, "in_process": True, "repeats": repeats,
                         "diag_exact": report["overall"].get("diag_exact"), "miou": report["overall"].get("miou")}}


def measure_kv_cache(config_name: str, question_id: int = 1, new_tokens: int = 64, repeats: int = 5) -> dict[str, Any]:
    """Greedy ``generate`` tokens/s of a freshly built 3D model with ``use_cache`` True vs False.

    Exactly ``new_tokens`` are generated (``min_new_tokens``), the prompt's prefill included in the time.
    """
    from ..families import load_experiment_config
    from ..models.reasonknee3d.modeling_reasonknee3d import build_reasonknee3d

    exp = load_experiment_config(config_name)
    torch.manual_seed(0)
    model, processor = build_reasonknee3d(exp.model, exp.data)
    model.eval()
    prompt, _ = _text(question_id, processor.volume_size)
    volume = torch.randn(*processor.volume_size)
    inputs = dict(processor([volume], [prompt]))
    prompt_len = inputs["input_ids"].shape[1]

    def generate(use_cache: bool) -> None:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 use_cache=use_cache, pad_token_id=processor.tokenizer.pad_token_id)
        if out.shape[1] - prompt_len != new_tokens:
            raise RuntimeError(f"generate returned {out.shape[1] - prompt_len} new tokens, expected {new_tokens}")

    times = time_interleaved({"cache": functools.partial(generate, True),
                              "no_cache": functools.partial(generate, False)}, repeats)
    rates = {key: new_tokens / statistics.median(t) for key, t in times.items()}
    return {"speedup": rates["cache"] / rates["no_cache"], "tokens_per_s": rates, "repeats_s": times,
            "settings": {"config": exp.source, "new_tokens": new_tokens, "prompt_tokens": int(prompt_len),
                         "batch_size": 1, "repeats": repeats}}


# --- the whole run ------------------------------------------------------------------------------------

def run_bench(out: Optional[str | Path] = None, repeats: Optional[int] = None, quick: bool = False,
              settings: Optional[BenchSettings] = None) -> dict[str, Any]:
    """Measure every figure (see the module docstring); returns them JSON-ready and writes them to ``out``.

    ``repeats`` overrides the timed runs of every figure, training steps included; ``quick`` runs
    on tiny configs and sizes (a smoke test: its figures say nothing about the real configs).
    """
    from transformers import AutoConfig

    from ..models.tiny_qwen import build_tiny_qwen2_5_vl

    s = settings or (QUICK if quick else BENCH)
    if repeats is not None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        s = replace(s, repeats=repeats, train_repeats=repeats)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    details: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="reasonknee3d-bench-") as tmp:
        work = Path(tmp)
        logger.info("matmul peak (%d x %d fp32)", s.matmul_size, s.matmul_size)
        details["matmul_peak"] = measure_matmul_peak(s.matmul_size, s.repeats)
        logger.info("bench language model %s", s.lm or "tiny defaults")
        lm_dir = build_tiny_qwen2_5_vl(work / "lm", **s.lm)
        exp3d_real, exp_slice_real = load_experiments(s)
        exp3d, exp_slice = load_experiments(s, lm_dir)
        volume = synthetic_volume(s.volume_shape)
        prompt, answer = _text(s.question_id, s.volume_shape)

        logger.info("tokens per volume")
        tokens = details["tokens_per_volume"] = measure_tokens_per_volume(exp3d_real, exp_slice_real, lm_dir, volume,
                                                                          prompt)
        visual = {"3d": tokens["3d"], "slice": tokens["slice"]}
        logger.info("training steps (3D %d, slice %d visual tokens)", visual["3d"], visual["slice"])
        train = details["train_step"] = measure_train_step(exp3d, exp_slice, volume, s.question_id, prompt, answer,
                                                           visual, s.train_repeats)
        logger.info("real-size step FLOPs (meta device)")
        text_config = s.real_text_config or AutoConfig.from_pretrained(lm_dir).text_config.to_dict()
        details["train_step_flops_real_size"] = count_real_size_flops(exp3d_real, text_config, visual,
                                                                      train["text_tokens"]["3d"])
        # On a GPU the encoders are timed at their real sizes in bfloat16; a CPU times them reduced in fp32.
        gpu = torch.cuda.is_available()
        logger.info("encoder step: vit3d vs swin3d (%s), and their real-size FLOPs",
                    "real sizes, bfloat16, GPU" if gpu else "reduced sizes")
        details["encoder_step"] = measure_encoder_step(
            encoder_configs(exp3d_real, s.swin3d, None if gpu else s.encoder_step_reduce), s.train_repeats,
            device="cuda" if gpu else "cpu", dtype=torch.bfloat16 if gpu else torch.float32)
        details["encoder_flops_real_size"] = count_encoder_flops_real_size(encoder_configs(exp3d_real, s.swin3d))
        logger.info("volume cache")
        details["cache"] = measure_cache(exp3d_real, work / "cache", s.repeats)
        logger.info("scoring %d lines", s.score_lines)
        details["score"] = measure_score_rate(s.score_lines, work / "score", s.repeats)
        logger.info("generation with and without KV cache")
        details["kv_cache"] = measure_kv_cache(s.gen_config, s.question_id, s.gen_new_tokens, s.repeats)

    peak = details["matmul_peak"]["peak_flops"]
    achieved = train["3d"]["flops_per_step"] / train["3d"]["median_s"]
    details["mfu"] = {"mfu": achieved / peak, "achieved_flops": achieved, "peak_flops": peak,
                      "settings": {"step": "3D training step of train_step", "flops": "FlopCounterMode, causal "
                                   "attention at half", "peak": "fastest fp32 torch.mm of matmul_peak"}}
    headline = {
        "tokens_per_volume": visual,
        "tokens_ratio": tokens["ratio"],
        "train_step_speedup": train["speedup"],
        "train_step_s": {"3d": train["3d"]["median_s"], "slice": train["slice"]["median_s"]},
        "train_step_flops_ratio_real_size": details["train_step_flops_real_size"]["ratio_causal"],
        "cache_speedup": details["cache"]["speedup"],
        "score_rate": details["score"]["lines_per_s"],
        "kv_cache_speedup": details["kv_cache"]["speedup"],
        "mfu": details["mfu"]["mfu"],
        "encoder_step_ratio": details["encoder_step"]["ratio"],
        "encoder_step_s": {k: details["encoder_step"][k]["median_s"] for k in ("vit3d", "swin3d")},
        "encoder_flops_ratio_real_size": details["encoder_flops_real_size"]["ratio"],
    }
    result = {
        **headline,
        "goals": {k: {"goal": g, "met": bool(headline[k] >= g)} for k, g in GOALS.items()},
        "limits": limits(details),
        "quick": quick,
        "seconds": time.perf_counter() - t_start,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                    # 1-minute load average before and after: above the CPU count, other jobs shared the cores
                    # and the timed figures (the 3D step most) are slower than this machine can do.
                    "load_average": [load_start[0], os.getloadavg()[0]]},
        "settings": _plain(asdict(s)),
        "details": details,
    }
    result = _plain(result)
    if out is not None:
        write_json(out, result)
    return result


def _plain(obj: Any) -> Any:
    """JSON-ready copy: tuples -> lists, tensors and numpy numbers -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def limits(d: dict[str, Any]) -> dict[str, str]:
    """What bounds each headline figure, in one sentence each, from ``run_bench``'s ``details``."""
    train, real = d["train_step"], d["train_step_flops_real_size"]
    lm = train["settings"]["language_model"]
    return {
        "tokens_ratio": "fixed by the configs, not by this machine: the 3D encoder's patch and pool sizes against "
                        "the slice baseline's frame count and frame size",
        "train_step_speedup": f"bench sizes on a CPU in fp32: language model hidden {lm['hidden_size']} x "
                              f"{lm['num_hidden_layers']} layers, where attention over the slice sequence dominates; "
                              f"reduced encoder ({100 * train['3d'].get('encoder_share', 0):.0f} % of the 3D FLOPs); "
                              f"FLOP ratio {train['flops_ratio']:.1f}x. Another job on the cores slows the 3D step "
                              f"(many small ops) far more than the slice step: torch's threads wait for each other "
                              f"(see machine.load_average)",
        "train_step_flops_ratio_real_size": f"counted, not timed: the real ViT-B encoder over 9,216 patches is "
                                            f"{100 * real['encoder_share_3d']:.0f} % of the 3D step's FLOPs; causal "
                                            f"attention at half, activation checkpointing and LoRA not counted",
        "cache_speedup": "the NIfTI side is gzip decoding + resampling; the cache side is one read of the "
                         f"float16 array ({'x'.join(map(str, d['cache']['settings']['input_shape']))}) from the page "
                         "cache into memory, bound by memory bandwidth (a cold disk read is slower)",
        "score_rate": "pure-Python parsing of each output on one core; report writing without plots",
        "kv_cache_speedup": "tiny model: per-token Python overhead of generate bounds the cached rate; the gain "
                            "grows with the number of generated tokens",
        "mfu": "fp32 on 2 CPU cores: small matrices, conv3d and CPU attention kernels run far below the matmul peak",
        "encoder_step_ratio": _encoder_limit(d["encoder_step"]),
        "encoder_flops_ratio_real_size": "counted, not timed: full attention grows with the square of the patch "
                                         "count, window attention linearly, so the ratio grows with the volume; "
                                         "activation checkpointing not counted",
    }


def _encoder_limit(enc: dict[str, Any]) -> str:
    st = enc["settings"]
    where = "a CPU" if st.get("device", "cpu") == "cpu" else st["device"]
    return (f"encoders on {where} in {st.get('dtype', 'float32')} (vit3d {enc['vit3d']['parameters'] / 1e6:.1f} M, "
            f"swin3d {enc['swin3d']['parameters'] / 1e6:.1f} M parameters), first-stage patches ({enc['vit3d']['first_stage_patches']:,} vs "
            f"{enc['swin3d']['first_stage_patches']:,}); FLOP ratio {enc['flops_ratio']:.1f}x. MONAI's window "
            f"attention adds per-step work the FLOPs do not count (shift mask, window partition, eager softmax)")


def print_table(result: dict[str, Any], console: Any = None) -> None:
    """The headline figures, their goals and what each was measured on (a rich table), then their limits."""
    from rich.console import Console
    from rich.table import Table

    d = result["details"]
    train, real, kv, tok = d["train_step"], d["train_step_flops_real_size"], d["kv_cache"], d["tokens_per_volume"]
    rows = [
        ("tokens_ratio", f"{result['tokens_ratio']:.2f}x",
         f"3D {tok['3d']:,} vs slice {tok['slice']:,} tokens, {'x'.join(map(str, tok['settings']['volume_shape']))}"),
        ("train_step_speedup", f"{result['train_step_speedup']:.2f}x",
         f"3D {train['3d']['median_s']:.2f} s vs slice {train['slice']['median_s']:.2f} s "
         f"({train['3d']['sequence_tokens']:,} vs {train['slice']['sequence_tokens']:,} tokens)"),
        ("train_step_flops_ratio_real_size", f"{real['ratio_causal']:.2f}x",
         f"3D {real['3d_flops_causal'] / 1e12:.2f} vs slice {real['slice_flops_causal'] / 1e12:.2f} TFLOP"),
        ("cache_speedup", f"{result['cache_speedup']:.1f}x",
         f"NIfTI {d['cache']['nifti_load_preprocess_s'] * 1e3:.0f} ms vs cache "
         f"{d['cache']['cache_load_s'] * 1e3:.1f} ms"),
        ("score_rate", f"{result['score_rate']:,.0f}/s",
         f"{d['score']['settings']['lines']:,} lines in {d['score']['median_s']:.2f} s"),
        ("kv_cache_speedup", f"{result['kv_cache_speedup']:.1f}x",
         f"{kv['tokens_per_s']['cache']:.1f} vs {kv['tokens_per_s']['no_cache']:.1f} tokens/s"),
        ("mfu", f"{100 * result['mfu']:.1f} %",
         f"{d['mfu']['achieved_flops'] / 1e9:.1f} of {d['mfu']['peak_flops'] / 1e9:.1f} GFLOP/s"),
        ("encoder_step_ratio", f"{result['encoder_step_ratio']:.2f}x",
         f"vit3d {d['encoder_step']['vit3d']['median_s']:.2f} s vs swin3d {d['encoder_step']['swin3d']['median_s']:.2f}"
         f" s forward + backward, {'x'.join(map(str, d['encoder_step']['settings']['volume_shape']))} (reduced "
         f"width; {d['encoder_step']['vit3d']['flops'] / 1e9:.1f} vs {d['encoder_step']['swin3d']['flops'] / 1e9:.1f}"
         f" GFLOP)"),
        ("encoder_flops_ratio_real_size", f"{result['encoder_flops_ratio_real_size']:.2f}x",
         f"vit3d {d['encoder_flops_real_size']['vit3d']['flops'] / 1e12:.2f} vs swin3d "
         f"{d['encoder_flops_real_size']['swin3d']['flops'] / 1e12:.2f} TFLOP forward + backward, "
         f"{'x'.join(map(str, d['encoder_flops_real_size']['vit3d']['input_size']))}"),
    ]
    load, cpus = max(result["machine"]["load_average"]), result["machine"]["cpus"]
    title = (f"reasonknee3d bench{' --quick (tiny configs: not the real figures)' if result['quick'] else ''}, "
             f"{result['seconds']:.0f} s, medians"
             + (f" - BUSY MACHINE (load {load:.1f} on {cpus} CPUs): timings are slower than it can do" if load > cpus
                else ""))
    table = Table(title=title)
    for col in ("figure", "value", "goal", "measured"):
        table.add_column(col)
    for name, value, measured in rows:
        goal = result["goals"].get(name)
        table.add_row(name, value, "" if goal is None else f">= {goal['goal']:g} {'met' if goal['met'] else 'NOT met'}",
                      measured)
    console = console or Console()
    console.print(table)
    for name, text in result["limits"].items():
        console.print(f"[bold]{name}[/bold]: {text}")
