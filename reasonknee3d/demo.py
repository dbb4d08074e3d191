"""`reasonknee3d demo`: the whole loop on the embedded default, on a CPU, in minutes.

synthetic release -> train a tiny 3D-native model and a tiny slice baseline (the same tiny Qwen2.5-VL-format
LM under both) -> predict on the test split -> score both on ReasonKnee-Bench -> a side-by-side table
(3D-native, slice baseline, majority baseline), a comparison report with plots and a few ``infer`` pictures.
Every step writes under one output folder and is skipped on a rerun when its result is already there.

The folder is marked with ``io_utils.OUTPUT_MARKER`` naming the demo's settings. A rerun with the same
settings resumes; a folder the demo did not write is refused; one written with other settings (``--quick``
vs full) is refused unless ``overwrite``, which then deletes the demo's own entries (``DEMO_ENTRIES``) and
starts over. Refusing rather than retraining in place keeps the earlier run's models until the user asks
to replace them, and reusing them would report one run's models under the other's settings.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .constants import DEFAULT_BOX_DECODING
from .evaluation.tune_prior import DEFAULT_TAUS
from .io_utils import write_json, write_text

TABLE_METRICS = ("diag_exact", "balanced_acc", "qwk", "miou", "acc_iou50", "parse_fail_severity", "parse_fail_box")
DEMO_MODELS = {"3d": "tiny_3d", "slice": "tiny_slice"}
"""Table row -> the preset it trains (``reasonknee3d/configs/``)."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run (the defaults train each family for minutes on a CPU, see README.md for a dated
    measurement; ``QUICK`` is a smoke test of every step, ``FULL`` the longer setting of ``demo --full``)."""

    volumes: int = 40
    """Synthetic volumes (about 70/10/20 % train/val/test by patient)."""
    shape: tuple[int, int, int] = (32, 64, 64)
    """(S, H, W) of each synthetic volume (the tiny configs' model input size)."""
    seed: int = 0
    """Seed of the synthetic release and of training."""
    max_steps: int = 900
    """Optimizer steps per family."""
    batch_size: int = 8
    """Training batch size per family."""
    learning_rate: float = 3e-3
    """Peak learning rate (cosine schedule) for both families."""
    max_new_tokens: int = 256
    """Generation budget per answer (the synthetic answers need at most about 170 tokens)."""
    test_limit: Optional[int] = None
    """Score only the first N test samples (None: all)."""
    pictures: int = 2
    """``infer`` pictures written for the 3D-native model."""
    pretrain_steps: int = 300
    """Steps of ``train.stage: region_grades`` (batch ``batch_size`` volumes, each box cropped and encoded as the
    region look does: ``train.pretrain.roi: crop``) before the 3D-native model trains; its encoder then starts
    from the pretrained one, and the region_grades model itself is the ``3d_classifier`` row. 0: no pretraining
    and no classifier rows."""
    pretrain_class_balance: float = 1.0
    """``train.pretrain.class_balance`` of the pretraining: 1 weighs every grade of a head equally, what balanced
    accuracy rewards."""
    box_decoding: str = DEFAULT_BOX_DECODING
    """How both families' constrained decoding picks box coordinates (``constants.BOX_DECODINGS``)."""
    grade_prior_taus: tuple[float, ...] = ()
    """Grade-prior strengths tried on the val split for each family (``tune-grade-prior``); the test split is then
    predicted with the one of highest val balanced accuracy. Empty: plain decoding, no tuning."""


CLASSIFIER_ROWS = {"3d_classifier": "predictions_3d.jsonl", "3d_classifier_reference_boxes": "reference"}
"""Rows of the direct 3D classifier (``evaluation/classify.py``) -> where its boxes come from: the 3D-native
model's predictions, or the release's boxes (an oracle for localization, reported apart from the table)."""

DEMO_ENTRIES = ("release", "runs", "reports", "tuning", "pictures", "references_train.jsonl", "references_test.jsonl",
                *(f"predictions_{f}{sfx}.jsonl" for f in (*DEMO_MODELS, *CLASSIFIER_ROWS) for sfx in ("", ".skipped")),
                *(f"predictions_{f}.settings.json" for f in DEMO_MODELS),
                "comparison.json", "comparison.md", "comparison.png", "demo_timings.json")
"""What the demo writes under its folder (and all that ``overwrite`` deletes, with the marker)."""


def prepare_demo_dir(out: Path, settings: dict[str, Any], overwrite: bool) -> str:
    """Check and mark the demo folder; returns ``new``, ``resume`` (same settings) or ``overwrite``.

    Raises ``io_utils.OutputDirError`` for a folder the demo did not write, or one written with other
    settings without ``overwrite``.
    """
    from .io_utils import OUTPUT_MARKER, check_output_dir, output_marker, read_output_marker, write_output_marker

    earlier = read_output_marker(out) if out.is_dir() else None
    same = (earlier is not None and earlier["command"] == "demo"
            and earlier.get("settings") == output_marker("demo", settings)["settings"])
    if same and not overwrite:
        return "resume"
    earlier = check_output_dir(out, "demo", overwrite, settings, replaces_folder=False)
    if earlier is not None:
        for name in (*DEMO_ENTRIES, OUTPUT_MARKER):
            entry = out / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    write_output_marker(out, "demo", settings)
    return "new" if earlier is None else "overwrite"


QUICK = DemoSettings(volumes=6, max_steps=10, batch_size=4, max_new_tokens=160, test_limit=16, pictures=1,
                     pretrain_steps=10)

FULL = DemoSettings(volumes=100, max_steps=9000, pretrain_steps=600, grade_prior_taus=DEFAULT_TAUS)
"""``demo --full``: 2.5x the volumes, 10x the training steps per family and twice the pretraining steps, and each
family's test answers decoded with the grade-prior tau chosen on val. Where the default demo's 3D-native model
still writes about one box per question, here its boxes follow each volume's anatomy and its balanced accuracy is
about 0.1 above the majority's (docs/results.md); over an hour on a 2-core CPU."""


def _experiment(row: str, overrides: tuple[str, ...] | list[str] = ()) -> Any:
    from .families import load_experiment_config
    return load_experiment_config(DEMO_MODELS[row], overrides)


def _pretrain(release: Path, run_dir: Path, s: DemoSettings) -> tuple[Path, float]:
    """``train.stage: region_grades`` on the 3D preset's encoder; returns its output folder and seconds."""
    from .training.trainer import run_training

    timing = run_dir / "demo_train_seconds.json"
    if (run_dir / "encoder").is_dir() and timing.is_file():
        return run_dir, float(json.loads(timing.read_text())["seconds"])
    exp = _experiment("3d", [
        "train.stage=region_grades", "train.encoder=full", "train.projector=frozen", "train.language_model=frozen",
        "train.new_token_rows=false", f"train.data_dir={json.dumps(str(release))}",
        f"train.output_dir={json.dumps(str(run_dir))}", f"train.max_steps={s.pretrain_steps}",
        "train.pretrain.roi=crop", f"train.pretrain.class_balance={s.pretrain_class_balance}",
        f"train.save_steps={max(s.pretrain_steps, 1)}",
        f"train.per_device_batch_size={s.batch_size}", f"train.seed={s.seed}",
        f"train.learning_rate={s.learning_rate}"])
    t0 = time.perf_counter()
    result = run_training(exp)
    seconds = time.perf_counter() - t0
    write_json(timing, {"seconds": seconds, "global_step": result.global_step})
    return run_dir, seconds


def _train(row: str, release: Path, run_dir: Path, s: DemoSettings,
           encoder_from: Optional[Path] = None) -> tuple[Path, float]:
    from .training.trainer import run_training

    final = run_dir / "final"
    timing = run_dir / "demo_train_seconds.json"
    if final.is_dir() and timing.is_file():
        return final, float(json.loads(timing.read_text())["seconds"])
    start = [f"model.encoder.init_from={json.dumps(str(encoder_from))}"] if encoder_from is not None else []
    exp = _experiment(row, [*start,
        f"train.data_dir={release}", f"train.output_dir={run_dir}", f"train.max_steps={s.max_steps}",
        f"train.per_device_batch_size={s.batch_size}", f"train.save_steps={max(s.max_steps, 1)}",
        f"train.seed={s.seed}", f"train.learning_rate={s.learning_rate}"])
    t0 = time.perf_counter()
    result = run_training(exp)
    seconds = time.perf_counter() - t0
    write_json(timing, {"seconds": seconds, "global_step": result.global_step})
    return result.final_dir, seconds


def _row(report: dict[str, Any], key: str) -> dict[str, float]:
    return {m: report[key].get(m) for m in TABLE_METRICS}


def comparison_table(reports: dict[str, dict], extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{"3d": {...}, "slice": {...}, [classifier rows], "majority": {...}}`` with the table's metrics (majority
    from the 3D report); the classifier in reference boxes comes last, after the majority row."""
    table = {name: {**_row(rep, "overall"), **extra.get(name, {})} for name, rep in reports.items()
             if name != "3d_classifier_reference_boxes"}
    first = next(iter(reports.values()))
    table["majority"] = {**_row(first, "majority_baseline"), "train_seconds": None, "visual_tokens": None}
    if "3d_classifier_reference_boxes" in reports:
        table["3d_classifier_reference_boxes"] = {**_row(reports["3d_classifier_reference_boxes"], "overall"),
                                                  **extra.get("3d_classifier_reference_boxes", {})}
    return table


SMOKE_TEST_NOTE = ("smoke test (--quick): a few training steps on a few volumes; the numbers only show that "
                   "every step ran, not how the models compare")
"""Said in the printed table's title and in comparison.md of a ``--quick`` run."""


def _title(quick: bool) -> str:
    return "ReasonKnee-Bench, synthetic test split" + (" - SMOKE TEST (--quick), not a comparison" if quick else "")


def _tune(model: Path, release: Path, out: Path, s: DemoSettings) -> float:
    """The grade-prior tau of highest val balanced accuracy (``tune-grade-prior``; a rerun reuses its choice)."""
    from .evaluation.tune_prior import RESULT_FILE, tune_grade_prior
    if (out / RESULT_FILE).is_file():
        return float(json.loads((out / RESULT_FILE).read_text())["chosen_tau"])
    return float(tune_grade_prior(model, release, out, s.grade_prior_taus, batch_size=16, limit=s.test_limit,
                                  max_new_tokens=s.max_new_tokens, box_decoding=s.box_decoding)["chosen_tau"])


def _markdown(table: dict[str, dict[str, Any]], s: DemoSettings, quick: bool = False,
              timings: Optional[dict[str, float]] = None, side_box: Optional[dict[str, Any]] = None) -> str:
    cols = [*TABLE_METRICS, "train_seconds", "visual_tokens"]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# reasonknee3d demo: 3D-native vs slice baseline on the synthetic test split"
             + (" (smoke test)" if quick else ""), "",
             *([f"**{SMOKE_TEST_NOTE[0].upper()}{SMOKE_TEST_NOTE[1:]}.**", ""] if quick else []),
             f"Settings: {json.dumps(asdict(s))}", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    oracle = "3d_classifier_reference_boxes"
    for name, row in table.items():
        if name != oracle:
            lines.append(f"| {name} | " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    lines += ["", "Full reports: `reports/<row>/report.md`. The majority baseline answers "
              "the most common train grade per (question, field) and the per-question median train box."]
    if side_box is not None:
        lines += ["", f"The median train box per question *and knee side*, still without looking at the image: miou "
                  f"{fmt(side_box['miou'])}, acc_iou50 {fmt(side_box['acc_iou50'])}. The 3D model sees every knee "
                  "in the right knee's frame (`data.canonical_side`), so one box per question already scores this "
                  "much; its localization is its margin over this box, and the per-axis `tracking` in "
                  "`reports/3d/report.md` says whether its boxes follow each volume's anatomy."]
    if "3d_classifier" in table:
        sources = table["3d_classifier"].get("box_sources")  # None when a resumed demo wrote no new prediction
        lines += ["", "`3d_classifier`: the region_grades model (the 3D model's pretrained encoder on a crop of each box "
                  "and one linear head per category and field) grading in the boxes the 3D-native model wrote, no "
                  "language model" + (f"; boxes: {json.dumps(sources)}" if sources else "")
                  + ". Its train_seconds are the pretraining's."]
    if oracle in table:
        lines += ["", "The same classifier in the reference boxes (an oracle for localization, so its IoU is 1 and "
                  "it is not comparable with the rows above):", "",
                  "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|",
                  f"| {oracle} | " + " | ".join(fmt(table[oracle].get(c)) for c in cols) + " |"]
    taus = {name: row["grade_prior_tau"] for name, row in table.items() if row.get("grade_prior_tau") is not None}
    if taus:
        lines += ["", "Grade-prior decoding (`predict --grade-prior-tau`), tau chosen per model on the val split by "
                  f"balanced accuracy among {list(s.grade_prior_taus)} (`tuning/<row>/grade_prior.json`): "
                  + ", ".join(f"{k} {v:g}" for k, v in taus.items()) + "."]
    if timings:
        lines += ["", "Time split (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    return "\n".join(lines) + "\n"


PLOT_METRICS = ("diag_exact", "balanced_acc", "qwk", "miou", "acc_iou50")


def plot_limits(table: dict[str, dict[str, Any]]) -> tuple[float, float]:
    """y range of the comparison plot: from the data (qwk can be as low as -1), with 0 and 1 always shown."""
    values = [float(row[m]) for row in table.values() for m in PLOT_METRICS if row.get(m) is not None]
    lo, hi = min([0.0, *values]), max([1.0, *values])
    pad = 0.05 * (hi - lo)
    return lo - (pad if lo < 0 else 0.0), hi + pad


def _plot(table: dict[str, dict[str, Any]], out: Path, quick: bool = False) -> Any:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .io_utils import atomic_path

    metrics = list(PLOT_METRICS)
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / max(len(table), 1)
    for i, (name, row) in enumerate(table.items()):
        ax.bar(x + (i - (len(table) - 1) / 2) * width, [row.get(m) or 0.0 for m in metrics], width, label=name)
    ax.set_xticks(x, metrics)
    ax.set_ylim(*plot_limits(table))
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.legend(fontsize=8)
    ax.set_title("ReasonKnee-Bench on the synthetic test split" + (" (smoke test, --quick)" if quick else ""))
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return fig


TABLE_WIDTH = 99
"""The printed table's widest line (columns)."""
SHORT_NAMES = {"balanced_acc": "bal_acc", "acc_iou50": "iou50", "parse_fail_severity": "fail_sev",
               "parse_fail_box": "fail_box", "train_seconds": "train_s", "visual_tokens": "vis_tok"}
"""Column headers of the printed table (comparison.md keeps the full names)."""


def _print_table(table: dict[str, dict[str, Any]], quick: bool = False, file: Any = None) -> None:
    import shutil as _shutil

    from rich import box
    from rich.console import Console
    from rich.table import Table

    cols = [*TABLE_METRICS, "train_seconds", "visual_tokens"]
    t = Table(title=_title(quick), caption=SMOKE_TEST_NOTE if quick else None, box=box.SIMPLE_HEAD,
              padding=(0, 1), pad_edge=False, show_edge=False)
    t.add_column("model", no_wrap=True)
    for c in cols:
        t.add_column(SHORT_NAMES.get(c, c), justify="right", no_wrap=True)
    for name, row in table.items():
        t.add_row(name, *("-" if row.get(c) is None else (f"{row[c]:.3f}" if isinstance(row[c], float)
                                                            else str(row[c])) for c in cols))
    width = min(_shutil.get_terminal_size((TABLE_WIDTH, 24)).columns, TABLE_WIDTH)
    Console(width=width, file=file).print(t)


@contextlib.contextmanager
def quiet_libraries():
    """Only the demo's own lines, progress bars of the work and its table: transformers' warnings, info
    messages and its weight loading / shard writing bars are silenced (restored afterwards), and so are
    FutureWarnings (deprecations inside transformers that the user cannot act on)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"transformers(\.|$)")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def run_demo(out: str | Path = "demo_out", quick: bool = False, settings: Optional[DemoSettings] = None,
             overwrite: bool = False) -> dict:
    """Run the demo into ``out``; returns the comparison table (also in ``out/comparison.json``).

    ``out`` must be new or empty, or an earlier demo folder: with the same settings the run resumes, with
    other settings ``overwrite`` is needed (see the module docstring). Settings smaller than the default
    training (``--quick``) are marked as a smoke test in the printed table, comparison.md and the plot.
    """
    with quiet_libraries():
        return _run_demo(Path(out), quick, settings, overwrite)


def _run_demo(out: Path, quick: bool, settings: Optional[DemoSettings], overwrite: bool) -> dict:
    from .data.release import export_references
    from .data.synth import write_synthetic_release
    from .evaluation.infer import infer
    from .evaluation.predict import predict
    from .evaluation.score import score_files

    s = settings or (QUICK if quick else DemoSettings())
    smoke = s.max_steps < DemoSettings.max_steps  # --quick, or settings too small for the comparison to mean much
    t_start = time.perf_counter()
    release = out / "release"
    step = lambda msg: print(f"[demo {time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)  # noqa: E731
    state = prepare_demo_dir(out, {"quick": settings is None and quick, **asdict(s)}, overwrite)
    if state != "new":
        step(f"{'resuming the earlier demo' if state == 'resume' else 'replacing the earlier demo'} in {out}")

    if not release.is_dir():  # written whole or not at all (write_synthetic_release)
        step(f"writing a synthetic release of {s.volumes} volumes {s.shape} to {release}")
        print(write_synthetic_release(release, n_volumes=s.volumes, shape=s.shape, seed=s.seed))
    refs = {}
    for split in ("train", "test"):
        refs[split] = out / f"references_{split}.jsonl"
        result = export_references(release, split, refs[split])
        if not result.ok:
            raise RuntimeError(f"export-references skipped {len(result.skipped)} items of {split}: "
                               f"see {result.skipped_path}")
    if s.test_limit is not None:
        lines = refs["test"].read_text().splitlines()[: s.test_limit]
        write_text(refs["test"], "\n".join(lines) + "\n")

    reports, extra, models = {}, {}, {}
    timings: dict[str, float] = {}
    pretrained: Optional[Path] = None
    if s.pretrain_steps > 0:
        step(f"pretraining the 3D encoder on the grades in each reference box ({s.pretrain_steps} steps)")
        pretrained, timings["pretrain"] = _pretrain(release, out / "runs" / "region_grades", s)
    for row in DEMO_MODELS:
        step(f"training the tiny {row} model ({s.max_steps} steps, batch {s.batch_size})"
             + (", encoder from the pretraining" if row == "3d" and pretrained is not None else ""))
        models[row], seconds = _train(row, release, out / "runs" / row, s,
                                      encoder_from=pretrained / "encoder" if row == "3d" and pretrained else None)
        timings[f"train_{row}"] = seconds
        tau = 0.0
        if s.grade_prior_taus:
            step(f"choosing the {row} model's grade-prior tau on the val split (taus {list(s.grade_prior_taus)})")
            t0 = time.perf_counter()
            tau = _tune(models[row], release, out / "tuning" / row, s)
            timings[f"tune_{row}"] = time.perf_counter() - t0
        step(f"predicting the test split with the {row} model" + (f" (grade-prior tau {tau:g})" if tau else ""))
        t0 = time.perf_counter()
        preds = out / f"predictions_{row}.jsonl"
        pred = predict(models[row], release, "test", preds, batch_size=16, limit=s.test_limit,
                       max_new_tokens=s.max_new_tokens, box_decoding=s.box_decoding, grade_prior_tau=tau)
        if pred.skipped:
            raise RuntimeError(f"predict skipped {len(pred.skipped)} test samples of the {row} model: see "
                               f"{pred.skipped_path}")
        timings[f"predict_{row}"] = time.perf_counter() - t0
        reports[row] = score_files(preds, refs["test"], out / "reports" / row, majority_source=refs["train"])
        extra[row] = {"train_seconds": round(seconds, 1), "visual_tokens": _visual_tokens(row, s.shape),
                      **({"grade_prior_tau": tau} if s.grade_prior_taus else {})}
    if pretrained is not None:
        from .evaluation.classify import classify
        for row, boxes in CLASSIFIER_ROWS.items():
            step(f"grading the test split with the region_grades model ({row})")
            t0 = time.perf_counter()
            preds = out / f"predictions_{row}.jsonl"
            res = classify(pretrained, release, "test", preds, boxes=boxes if boxes == "reference" else out / boxes,
                           limit=s.test_limit)
            if res.skipped:
                raise RuntimeError(f"the classifier skipped {len(res.skipped)} test samples: see {res.skipped_path}")
            timings[f"predict_{row}"] = time.perf_counter() - t0
            reports[row] = score_files(preds, refs["test"], out / "reports" / row, majority_source=refs["train"])
            extra[row] = {"train_seconds": round(timings["pretrain"], 1), "visual_tokens": None,
                          "box_sources": res.box_sources if res.n_written else None}

    table = comparison_table(reports, extra)
    timings["total"] = time.perf_counter() - t_start
    write_json(out / "comparison.json", table)
    write_json(out / "demo_timings.json", timings)
    write_text(out / "comparison.md", _markdown(table, s, smoke, timings, reports["3d"].get("side_majority_box")))
    _plot(table, out / "comparison.png", smoke)

    step("writing infer pictures")
    test_refs = [json.loads(line) for line in refs["test"].read_text().splitlines()]
    from .data.release import iter_samples
    by_id = {smp.sample_id: smp for smp in iter_samples(release, "test")}
    picked = [r for r in test_refs if r["box"] is not None][:: max(1, len(test_refs) // max(s.pictures, 1))]
    pictures = []
    for r in picked[: s.pictures]:
        smp = by_id[r["sample_id"]]
        pictures.append(infer(models["3d"], smp.image_path, smp.question_id, gt_box=smp.box,
                              max_new_tokens=s.max_new_tokens, box_decoding=s.box_decoding,
                              png=out / "pictures" / f"infer_3d_{smp.volume_id}_q{smp.question_id}.png").png)
    _print_table(table, smoke)
    step("done")
    print(f"table:    {out / 'comparison.md'} (and comparison.json)\n"
          f"reports:  {out / 'reports' / '3d' / 'report.md'}, {out / 'reports' / 'slice' / 'report.md'}\n"
          f"pictures: {out / 'comparison.png'}"
          + "".join(f", {p}" for p in pictures), flush=True)
    return table


def _visual_tokens(row: str, shape: tuple[int, int, int]) -> int:
    """Visual tokens one volume of ``shape`` becomes in the language model of the row's preset."""
    from .families import get_family
    exp = _experiment(row)
    return int(get_family(exp.family).num_visual_tokens(exp, shape))
