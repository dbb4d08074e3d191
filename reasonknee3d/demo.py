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

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .io_utils import write_json, write_text

TABLE_METRICS = ("diag_exact", "balanced_acc", "qwk", "miou", "acc_iou50", "parse_fail_severity", "parse_fail_box")
DEMO_MODELS = {"3d": "tiny_3d", "slice": "tiny_slice"}
"""Table row -> the preset it trains (``reasonknee3d/configs/``)."""


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run (the defaults fit 10 minutes on a 2-core laptop CPU; ``quick`` fits 2)."""

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


DEMO_ENTRIES = ("release", "runs", "reports", "pictures", "references_train.jsonl", "references_test.jsonl",
                *(f"predictions_{f}{sfx}.jsonl" for f in DEMO_MODELS for sfx in ("", ".skipped")),
                "comparison.json", "comparison.md", "comparison.png")
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


QUICK = DemoSettings(volumes=6, max_steps=10, batch_size=4, max_new_tokens=160, test_limit=16, pictures=1)


def _experiment(row: str, overrides: tuple[str, ...] | list[str] = ()) -> Any:
    from .families import load_experiment_config
    return load_experiment_config(DEMO_MODELS[row], overrides)


def _train(row: str, release: Path, run_dir: Path, s: DemoSettings) -> tuple[Path, float]:
    from .training.trainer import run_training

    final = run_dir / "final"
    timing = run_dir / "demo_train_seconds.json"
    if final.is_dir() and timing.is_file():
        return final, float(json.loads(timing.read_text())["seconds"])
    exp = _experiment(row, [
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
    """``{"3d": {...}, "slice": {...}, "majority": {...}}`` with the table's metrics (majority from the 3D report)."""
    table = {name: {**_row(rep, "overall"), **extra.get(name, {})} for name, rep in reports.items()}
    first = next(iter(reports.values()))
    table["majority"] = {**_row(first, "majority_baseline"), "train_seconds": None, "visual_tokens": None}
    return table


def _markdown(table: dict[str, dict[str, Any]], s: DemoSettings) -> str:
    cols = [*TABLE_METRICS, "train_seconds", "visual_tokens"]
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# reasonknee3d demo: 3D-native vs slice baseline on the synthetic test split", "",
             f"Settings: {json.dumps(asdict(s))}", "",
             "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(c)) for c in cols) + " |")
    lines += ["", "Full reports: `reports/3d/report.md`, `reports/slice/report.md`. The majority baseline answers "
              "the most common train grade per (question, field) and the per-question median train box."]
    return "\n".join(lines) + "\n"


def _plot(table: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from .io_utils import atomic_path

    metrics = ["diag_exact", "balanced_acc", "qwk", "miou", "acc_iou50"]
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, (name, row) in enumerate(table.items()):
        ax.bar(x + (i - 1) * 0.27, [row.get(m) or 0.0 for m in metrics], 0.27, label=name)
    ax.set_xticks(x, metrics)
    ax.set_ylim(-0.1, 1)
    ax.legend()
    ax.set_title("ReasonKnee-Bench on the synthetic test split")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _print_table(table: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    cols = [*TABLE_METRICS, "train_seconds", "visual_tokens"]
    t = Table(title="ReasonKnee-Bench, synthetic test split")
    t.add_column("model")
    for c in cols:
        t.add_column(c, justify="right")
    for name, row in table.items():
        t.add_row(name, *("-" if row.get(c) is None else (f"{row[c]:.3f}" if isinstance(row[c], float)
                                                            else str(row[c])) for c in cols))
    Console(width=160).print(t)


def run_demo(out: str | Path = "demo_out", quick: bool = False, settings: Optional[DemoSettings] = None,
             overwrite: bool = False) -> dict:
    """Run the demo into ``out``; returns the comparison table (also in ``out/comparison.json``).

    ``out`` must be new or empty, or an earlier demo folder: with the same settings the run resumes, with
    other settings ``overwrite`` is needed (see the module docstring).
    """
    from .data.release import export_references
    from .data.synth import write_synthetic_release
    from .evaluation.infer import infer
    from .evaluation.predict import predict
    from .evaluation.score import score_files

    s = settings or (QUICK if quick else DemoSettings())
    out = Path(out)
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
    for row in DEMO_MODELS:
        step(f"training the tiny {row} model ({s.max_steps} steps, batch {s.batch_size})")
        models[row], seconds = _train(row, release, out / "runs" / row, s)
        step(f"predicting the test split with the {row} model")
        preds = out / f"predictions_{row}.jsonl"
        pred = predict(models[row], release, "test", preds, batch_size=16, limit=s.test_limit,
                       max_new_tokens=s.max_new_tokens)
        if pred.skipped:
            raise RuntimeError(f"predict skipped {len(pred.skipped)} test samples of the {row} model: see "
                               f"{pred.skipped_path}")
        reports[row] = score_files(preds, refs["test"], out / "reports" / row, majority_source=refs["train"])
        extra[row] = {"train_seconds": round(seconds, 1), "visual_tokens": _visual_tokens(row, s.shape)}

    table = comparison_table(reports, extra)
    write_json(out / "comparison.json", table)
    write_text(out / "comparison.md", _markdown(table, s))
    _plot(table, out / "comparison.png")

    step("writing infer pictures")
    test_refs = [json.loads(line) for line in refs["test"].read_text().splitlines()]
    from .data.release import iter_samples
    by_id = {smp.sample_id: smp for smp in iter_samples(release, "test")}
    picked = [r for r in test_refs if r["box"] is not None][:: max(1, len(test_refs) // max(s.pictures, 1))]
    for r in picked[: s.pictures]:
        smp = by_id[r["sample_id"]]
        infer(models["3d"], smp.image_path, smp.question_id, gt_box=smp.box, max_new_tokens=s.max_new_tokens,
              png=out / "pictures" / f"infer_3d_q{smp.question_id}.png")
    _print_table(table)
    step(f"done: {out / 'comparison.md'}")
    return table


def _visual_tokens(row: str, shape: tuple[int, int, int]) -> int:
    """Visual tokens one volume of ``shape`` becomes in the language model of the row's preset."""
    from .families import get_family
    exp = _experiment(row)
    return int(get_family(exp.family).num_visual_tokens(exp, shape))
