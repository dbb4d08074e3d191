"""``reasonknee3d bench --real-size``: the real presets end to end on a random-weight checkpoint of the true shapes.

Each real preset's preprocess, training steps (through ``run_training``) and a short ``predict`` run on a
Qwen2.5-VL-3B-shaped checkpoint built once into the user cache and a synthetic release at the real volume shape;
the result reports time, peak memory (host and GPU), tokens per sample and the counted FLOPs in a ``real_size``
section (``print_real_size_table``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..io_utils import write_json
from . import _plain, count_real_size_flops

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealSizeSettings:
    """What ``run_real_size_bench`` runs: each real preset's preprocess, training steps and a short predict on a
    random-weight Qwen2.5-VL-3B-shaped checkpoint (``tiny_qwen.qwen2_5_vl_3b_sizes``) and a synthetic release
    at the real volume shape. The defaults are the true shapes; ``layers`` and ``width_divisor`` shrink them."""

    config_3d: str = "rk3d_qwen2.5vl_3b"
    config_slice: str = "slice_qwen2.5vl_3b"
    volume_shape: tuple[int, int, int] = (160, 384, 384)
    """Synthetic release volumes (S, H, W): the OAI DESS grid the presets are made for."""
    volumes: int = 2
    questions: tuple[int, ...] = (1, 30)
    """Question ids with items: 2 volumes x 2 questions = 4 training samples (all in the train split). With
    ``volume_grouping`` G > 1 further ids follow (``release_questions``) until each volume has a multiple of G."""
    layers: Optional[int] = None
    """Decoder layers of the language model, blocks of the 3D encoder and of the slice vision tower (None: the
    real 36, 12 and 32)."""
    width_divisor: int = 1
    """Hidden and MLP sizes and head counts of all three divided by this (1: the real widths)."""
    steps: int = 1
    """Optimizer steps per family, batch size 1, no gradient accumulation."""
    predict_samples: int = 1
    predict_new_tokens: int = 8
    predict_constrained: bool = False
    """Constrained decoding (``predict``'s default) forces the whole answer tail, which needs a budget of its
    length (56 tokens for question 1 with the package's tokenizer); a few-token predict runs unconstrained."""
    seed: int = 0
    volume_grouping: int = 1
    """G > 1: the 3D preset also trains ``steps`` steps at batch G with ``train.volume_grouping: G``, each batch
    the G questions of one volume (the encoder runs once for them; augmentation drawn per volume), and the result
    gives the per-sample step time at batch 1 and at batch G beside the slice preset's."""

    def release_questions(self) -> list[int]:
        """The question ids the bench release has items for: ``questions``, then (with ``volume_grouping`` G > 1)
        the next ids of the schema until their number is a multiple of G, so that ``VolumeGroupedSampler`` cuts
        every volume's questions into full groups and every batch of G holds one volume."""
        from ..schema import load_schema

        out = list(dict.fromkeys(int(q) for q in self.questions))
        more = (q for q in sorted(load_schema()) if q not in out)
        while self.volume_grouping > 1 and len(out) % self.volume_grouping:
            out.append(next(more))
        return out


def _peak_reset() -> bool:
    """Start a new peak-memory window: CUDA's allocator peak, and the process's peak RSS where Linux allows
    (``/proc/self/clear_refs`` 5 resets it); False when the host peak keeps counting from the process start."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peaks(reset: bool) -> dict[str, Any]:
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"device_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "host_peak_rss_bytes": rss, "host_peak_since": "phase start" if reset else "process start"}


@contextlib.contextmanager
def _work_dir(work_dir: Optional[str | Path]) -> Any:
    """``work_dir`` as a Path (created), or a temporary folder removed on exit."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="reasonknee3d-bench-real-") as tmp:
        yield Path(tmp)


def _release_memory() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def real_size_checkpoint(s: RealSizeSettings) -> tuple[Path, dict[str, Any]]:
    """The random-weight Qwen2.5-VL checkpoint of ``s``'s shapes in the user cache (``default_tiny_qwen_dir``:
    built on first use, reused afterwards); returns its folder and how it was got."""
    from ..models.tiny_qwen import TINY_BUILD_MARKER, default_tiny_qwen_dir, qwen2_5_vl_3b_sizes

    sizes = qwen2_5_vl_3b_sizes(s.layers, s.layers, s.width_divisor)
    path = default_tiny_qwen_dir(build=False, **sizes)
    cached = (path / TINY_BUILD_MARKER).is_file()
    t0 = time.perf_counter()
    if not cached:
        logger.info("building the real-size checkpoint %s", path)
    path = default_tiny_qwen_dir(**sizes)
    return path, {"path": str(path), "reused": cached, "build_s": None if cached else time.perf_counter() - t0,
                  "sizes": sizes}


def real_size_model_overrides(s: RealSizeSettings, base: Any, lm_dir: Path) -> list[str]:
    """Overrides of a real preset ``base``'s model for the bench: the built checkpoint ``lm_dir``, and the 3D encoder
    at ``s.layers`` / ``s.width_divisor`` (the slice tower is in the checkpoint)."""
    out = [f"model.language_model={json.dumps({'path': str(lm_dir)})}"]
    encoder = getattr(base.model, "encoder", None)  # the 3D family's
    if encoder is not None:
        if s.layers is not None:
            out.append(f"model.encoder.num_hidden_layers={s.layers}")
        if s.width_divisor != 1:
            for key in ("hidden_size", "num_attention_heads", "intermediate_size"):
                if encoder[key] % s.width_divisor:
                    raise ValueError(f"width_divisor {s.width_divisor} does not divide the {base.source} encoder's "
                                     f"{key} {encoder[key]}")
                out.append(f"model.encoder.{key}={encoder[key] // s.width_divisor}")
    return out


def _real_size_overrides(s: RealSizeSettings, base: Any, lm_dir: Path, release: Path, run_dir: Path) -> list[str]:
    """``real_size_model_overrides``, and for training: the bench release and run folder, ``s.steps`` steps of one
    sample, nothing logged elsewhere."""
    return [*real_size_model_overrides(s, base, lm_dir),
            f"train.data_dir={json.dumps(str(release))}", f"train.output_dir={json.dumps(str(run_dir))}",
            f"train.max_steps={s.steps}", "train.per_device_batch_size=1", "train.gradient_accumulation_steps=1",
            "train.save_steps=1000000", "train.logging_steps=1", "train.report_to=[]",
            "train.dataloader_num_workers=0", f"train.seed={s.seed}"]


def _step_timer() -> Any:
    """Trainer callback: seconds of each optimizer step (forward, backward, optimizer; data loading is outside)
    and the first training batch's token counts, read from the Trainer's own dataloader."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.steps_s: list[float] = []
            self.batch: dict[str, int] = {}
            self._t0 = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None,
                           **kwargs: Any) -> None:
            from ..training.losses import answer_logits_only

            batch = next(iter(train_dataloader))
            self.batch = {"tokens_per_sample": int(batch["attention_mask"][0].sum()),
                          "answer_tokens": int((batch["labels"][0] != -100).sum()),
                          "logit_tokens": int(answer_logits_only(batch).get("logits_to_keep",
                                                                            batch["input_ids"].shape[1])),
                          "batch_size": int(batch["input_ids"].shape[0])}
            if torch.is_tensor(batch.get("volumes")):
                self.batch["distinct_volumes"] = int(batch["volumes"].shape[0])

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.steps_s.append(time.perf_counter() - self._t0)

    return StepTimer()


def _run_family(s: RealSizeSettings, exp_name: str, lm_dir: Path, release: Path, work: Path) -> tuple[Any, dict]:
    """Preprocess, train ``s.steps`` steps and predict with one real preset; (experiment, measurements)."""
    from ..evaluation.predict import predict
    from ..families import get_family, load_experiment_config
    from ..training.trainer import run_training

    base = load_experiment_config(exp_name)
    name = base.family
    exp = load_experiment_config(exp_name, _real_size_overrides(s, base, lm_dir, release, work / f"run_{name}"))
    family = get_family(exp.family)
    out: dict[str, Any] = {"config": exp.source}

    logger.info("real size %s: preprocess", name)
    reset, t0 = _peak_reset(), time.perf_counter()
    prep = family.preprocess(exp, release, ["train"])
    if prep.skipped:
        raise RuntimeError(f"real-size bench: preprocess skipped {[(k.item, k.reason) for k in prep.skipped]}")
    out["preprocess"] = {"seconds": time.perf_counter() - t0, "volumes": prep.n_done, **_peaks(reset)}
    _release_memory()

    logger.info("real size %s: %d training step(s)", name, s.steps)
    timer = _step_timer()
    reset, t0 = _peak_reset(), time.perf_counter()
    trained = run_training(exp, callbacks=[timer])
    seconds = time.perf_counter() - t0
    peaks = _peaks(reset)
    model = trained.model
    train = {"steps_s": timer.steps_s, "median_step_s": statistics.median(timer.steps_s), **timer.batch,
             "visual_tokens": family.num_visual_tokens(exp, s.volume_shape),
             "parameters": sum(p.numel() for p in model.parameters()),
             "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
             "run_training_s": seconds, "loss": trained.metrics.get("train_loss"), **peaks}
    train["text_tokens"] = train["tokens_per_sample"] - train["visual_tokens"]
    train["per_sample_s"] = train["median_step_s"] / train["batch_size"]
    out["train"] = train
    del trained, model
    _release_memory()

    if s.volume_grouping > 1 and name == "3d":
        out["train_grouped"] = _train_grouped(s, exp_name, base, lm_dir, release, work)

    logger.info("real size %s: predict %d sample(s), %d new tokens", name, s.predict_samples, s.predict_new_tokens)
    reset = _peak_reset()
    pred_path = work / f"predictions_{name}.jsonl"
    res = predict(work / f"run_{name}" / "final", release, "train", pred_path, batch_size=1, limit=s.predict_samples,
                  max_new_tokens=s.predict_new_tokens, constrained=s.predict_constrained)
    if res.skipped or res.n_written != s.predict_samples:
        raise RuntimeError(f"real-size bench: predict wrote {res.n_written} of {s.predict_samples} samples "
                           f"({[(k.item, k.reason) for k in res.skipped]})")
    out["predict"] = {"seconds": res.seconds, "samples": res.n_written, "max_new_tokens": s.predict_new_tokens,
                      "constrained": s.predict_constrained, **_peaks(reset)}
    _release_memory()
    return exp, out


def _train_grouped(s: RealSizeSettings, exp_name: str, base: Any, lm_dir: Path, release: Path,
                   work: Path) -> dict[str, Any]:
    """``s.steps`` training steps of the 3D preset at batch G = ``s.volume_grouping`` with ``train.volume_grouping:
    G``: every batch is the G questions of one volume (``release_questions``), whose encoder runs once."""
    from ..families import load_experiment_config
    from ..training.trainer import run_training

    g = s.volume_grouping
    exp = load_experiment_config(exp_name, [*_real_size_overrides(s, base, lm_dir, release, work / f"run_3d_g{g}"),
                                            f"train.per_device_batch_size={g}", f"train.volume_grouping={g}"])
    logger.info("real size 3d: %d training step(s) at batch %d, volume_grouping %d", s.steps, g, g)
    timer = _step_timer()
    reset, t0 = _peak_reset(), time.perf_counter()
    trained = run_training(exp, callbacks=[timer])
    seconds = time.perf_counter() - t0
    out = {"volume_grouping": g, "steps_s": timer.steps_s, "median_step_s": statistics.median(timer.steps_s),
           **timer.batch, "run_training_s": seconds, "loss": trained.metrics.get("train_loss"), **_peaks(reset)}
    if out.get("distinct_volumes") != 1:
        raise RuntimeError(f"real-size bench: the batch of {g} held {out.get('distinct_volumes')} distinct volumes, "
                           "expected the questions of one volume")
    out["per_sample_s"] = out["median_step_s"] / out["batch_size"]
    del trained
    _release_memory()
    return out


def run_real_size_bench(out: Optional[str | Path] = None, settings: Optional[RealSizeSettings] = None,
                        work_dir: Optional[str | Path] = None) -> dict[str, Any]:
    """Both real presets end to end at the true sizes (``RealSizeSettings``), on this machine's GPU when it has
    one: build (once, user cache) a random-weight checkpoint of Qwen2.5-VL-3B's shapes with the package's own
    tokenizer, write a synthetic release at the real volume shape, then per family ``preprocess``, train
    ``steps`` steps with ``run_training`` and ``predict`` a few tokens. Reports step time, tokens per sample,
    peak device / host memory of each phase and the step's FLOPs (``count_real_size_flops`` on the meta device,
    for the sizes that ran) beside them; with ``volume_grouping`` G > 1 also the 3D preset's step at batch G (one
    volume's G questions, ``train.volume_grouping: G``) and the step time per sample of each run (``per_sample``).
    Returns ``{"real_size": ..., "seconds", "machine"}`` (JSON-ready, also
    written to ``out``); the keys extend ``run_bench``'s output.

    ``work_dir`` (default: a temporary folder, removed afterwards) receives the release, runs and predictions.
    """
    from transformers import AutoConfig

    from ..data.synth import write_synthetic_release

    s = settings or RealSizeSettings()
    if s.steps < 1 or s.predict_samples < 1 or s.predict_new_tokens < 1 or s.volume_grouping < 1:
        raise ValueError(f"steps {s.steps}, predict_samples {s.predict_samples}, predict_new_tokens "
                         f"{s.predict_new_tokens} and volume_grouping {s.volume_grouping} must be >= 1")
    questions = s.release_questions()
    t_start, load_start = time.perf_counter(), os.getloadavg()
    lm_dir, checkpoint = real_size_checkpoint(s)
    text_config = AutoConfig.from_pretrained(lm_dir).text_config.to_dict()
    section: dict[str, Any] = {"checkpoint": checkpoint}
    with _work_dir(work_dir) as work:
        release = work / "release"
        t0 = time.perf_counter()
        write_synthetic_release(release, n_volumes=s.volumes, shape=s.volume_shape, seed=s.seed,
                                questions=questions)
        section["release"] = {"volumes": s.volumes, "shape": list(s.volume_shape), "questions": questions,
                              "seconds": time.perf_counter() - t0}
        exps = {}
        for key, name in (("3d", s.config_3d), ("slice", s.config_slice)):
            exps[key], section[key] = _run_family(s, name, lm_dir, release, work)
            if out is not None and key != "slice":
                # What has run so far is on disk, marked partial, in case a later family fails (minutes of a
                # GPU lease); the complete result replaces it below.
                write_json(out, _plain({"real_size": {**section, "partial": True},
                                        "seconds": time.perf_counter() - t_start}))

    visual = {k: section[k]["train"]["visual_tokens"] for k in ("3d", "slice")}
    for key in ("3d", "slice"):
        train = section[key]["train"]
        flops = count_real_size_flops(exps["3d"], text_config, visual, train["text_tokens"], train["logit_tokens"])
        train["flops_per_step"] = flops[f"{key}_flops"]
        train["flops_per_step_causal"] = flops[f"{key}_flops_causal"]
        train["achieved_flops_per_s"] = train["flops_per_step_causal"] / train["median_step_s"]
    section["step_ratio"] = section["slice"]["train"]["median_step_s"] / section["3d"]["train"]["median_step_s"]
    section["per_sample"] = _per_sample(section)
    section["settings"] = {**_plain(asdict(s)), "device": "cuda" if torch.cuda.is_available() else "cpu",
                           "language_model": {k: text_config.get(k) for k in (
                               "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "num_key_value_heads", "vocab_size")},
                           "encoder_3d": dict(exps["3d"].model.encoder),
                           "flops": "count_real_size_flops on the meta device for the sizes and tokens that ran: "
                                    "encoder trained in full, language model frozen (LoRA not counted), logits over "
                                    "the answer columns only, causal attention at half; activation checkpointing's "
                                    "extra forward not counted",
                           "true_shapes": s.layers is None and s.width_divisor == 1}
    result = _plain({
        "real_size": section,
        "quick": False,
        "seconds": time.perf_counter() - t_start,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "cuda": torch.cuda.is_available(),
                    "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    "load_average": [load_start[0], os.getloadavg()[0]]},
    })
    if out is not None:
        write_json(out, result)
    return result


def _per_sample(section: dict[str, Any]) -> dict[str, Any]:
    """Training step time per sample of the 3D preset at batch 1 (and at batch G with volume grouping) and of the
    slice preset, and slice / 3D for each G; keyed by G as a string."""
    slice_s = section["slice"]["train"]["per_sample_s"]
    runs = {"1": section["3d"]["train"]}
    if "train_grouped" in section["3d"]:
        runs[str(section["3d"]["train_grouped"]["volume_grouping"])] = section["3d"]["train_grouped"]
    return {"3d_s": {g: r["per_sample_s"] for g, r in runs.items()}, "slice_s": slice_s,
            "slice_over_3d": {g: slice_s / r["per_sample_s"] for g, r in runs.items()}}


def _gib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def print_real_size_table(result: dict[str, Any], console: Any = None) -> None:
    """One row per family and phase of ``run_real_size_bench``'s result (a rich table)."""
    from rich.console import Console
    from rich.table import Table

    r = result["real_size"]
    st = r["settings"]
    lm = st["language_model"]
    title = (f"reasonknee3d bench --real-size on {st['device']}"
             f"{'' if st['true_shapes'] else ' (REDUCED: layers %s, width / %s)' % (st['layers'], st['width_divisor'])}"
             f": LM hidden {lm['hidden_size']} x {lm['num_hidden_layers']} layers, vocab {lm['vocab_size']:,}; "
             f"{result['seconds']:.0f} s")
    table = Table(title=title)
    for col in ("family", "phase", "s", "tokens", "TFLOP", "GFLOP/s", "GPU peak", "host peak"):
        table.add_column(col)
    for key in ("3d", "slice"):
        f = r[key]
        t, pp, pr = f["train"], f["preprocess"], f["predict"]
        table.add_row(key, "preprocess", f"{pp['seconds']:.1f}", "", "", "", _gib(pp["device_peak_bytes"]),
                      _gib(pp["host_peak_rss_bytes"]))
        table.add_row(key, "train step", f"{t['median_step_s']:.2f}", f"{t['tokens_per_sample']:,} ({t['visual_tokens']:,} vis)",
                      f"{t['flops_per_step_causal'] / 1e12:.2f}", f"{t['achieved_flops_per_s'] / 1e9:.1f}",
                      _gib(t["device_peak_bytes"]), _gib(t["host_peak_rss_bytes"]))
        grouped = f.get("train_grouped")
        if grouped is not None:
            table.add_row(key, f"train step G={grouped['volume_grouping']}",
                          f"{grouped['median_step_s']:.2f}",
                          f"{grouped['tokens_per_sample']:,} (row 1 of {grouped['batch_size']})", "", "",
                          _gib(grouped["device_peak_bytes"]), _gib(grouped["host_peak_rss_bytes"]))
        table.add_row(key, "predict", f"{pr['seconds']:.1f}", "", "", "", _gib(pr["device_peak_bytes"]),
                      _gib(pr["host_peak_rss_bytes"]))
    console = console or Console()
    console.print(table)
    per = r.get("per_sample")
    if per is not None:
        samples = Table(title="training step time per sample (median step / batch size)")
        samples.add_column("")
        samples.add_column("s per sample")
        samples.add_column("slice / 3D")
        for g, t3d in per["3d_s"].items():
            samples.add_row(f"3D per sample (G={g})", f"{t3d:.3f}", f"{per['slice_over_3d'][g]:.2f}x")
        samples.add_row("slice per sample", f"{per['slice_s']:.3f}", "")
        console.print(samples)
    steps = len(r["3d"]["train"]["steps_s"])
    console.print(f"train step: median of {steps}, tokens per sample (visual), TFLOP counted (causal attention at "
                  f"half), GFLOP/s = TFLOP / step time; predict: {r['3d']['predict']['samples']} sample x "
                  f"{r['3d']['predict']['max_new_tokens']} tokens, model load included; peaks per phase")
    console.print(f"checkpoint: {r['checkpoint']['path']} ({'reused' if r['checkpoint']['reused'] else 'built'}); "
                  f"step time slice / 3D: {r['step_ratio']:.2f}x")
