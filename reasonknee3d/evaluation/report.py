"""The ReasonKnee-Bench report folder: report.json, report.md, per_sample.jsonl and PNG plots.

Every file is written atomically (``io_utils``), so a rerun into the same folder replaces the old
report cleanly; plots a run does not draw are removed rather than left stale. matplotlib is imported
only where plots are drawn (``write_plots``, or the ``PlotWorker`` child process), so scoring stays
import-light.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import traceback
import types
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from ..io_utils import atomic_open, atomic_path, write_json, write_text
from .metrics import BOX_AXIS_ERRORS, METRICS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .score import ScoreResult

PLOT_FILES = {"per_category": "per_category.png", "iou": "iou_histogram.png", "confusion": "confusion_ordinal.png"}
_BREAKDOWN_TITLES = (("by_category", "category"), ("by_structure", "structure"), ("by_compartment", "compartment"))
_ACCURACIES = ("diag_exact", "diag_field", "balanced_acc", "qwk", "miou", "acc_iou25", "acc_iou50")
_ENCODER = json.JSONEncoder(ensure_ascii=False)  # one encoder: json.dumps(..., kwargs) builds one per call


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value + 0.0:.3f}"  # + 0.0 turns -0.0 into 0.0


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def render_summary(report: dict) -> str:
    """Plain-text table of the overall metrics beside the majority baseline (what ``score`` prints)."""
    lines = [f"{'metric':<20} {'model':>7} {'majority':>9} {'n':>8} {'failed':>7}"]
    for m in METRICS:
        sup = report["support"][m]
        lines.append(f"{m:<20} {_fmt(report['overall'][m]):>7} {_fmt(report['majority_baseline'][m]):>9} "
                     f"{sup['n']:>8} {sup['parse_failures']:>7}")
    side = report.get("side_majority_box")
    if side is not None:
        lines.append(f"majority box per question and knee side: miou {_fmt(side['miou'])}, acc_iou50 "
                     f"{_fmt(side['acc_iou50'])} (a model that only knows the side matches it)")
    return "\n".join(lines)


def render_markdown(report: dict, plot_files: Sequence[str] = ()) -> str:
    """report.md: overall metrics beside the majority baseline with n and parse failures, input counts,
    breakdowns by category / structure / compartment (each cell "model (majority)"), confusion matrices."""
    c = report["counts"]
    lines = [
        "# ReasonKnee-Bench report", "",
        f"bench_version {report['bench_version']} · {report['n']} references "
        f"({c['references_with_box']} with a box, {c['field_pairs']} severity fields)", "",
    ]
    if "inputs" in report:
        lines += [f"- predictions: `{report['inputs']['predictions']}`",
                  f"- references: `{report['inputs']['references']}`"]
    lines += [f"- majority baseline from: {report['majority_source']}", "", "## Overall", ""]
    rows = [[m, _fmt(report["overall"][m]), _fmt(report["majority_baseline"][m]),
             str(report["support"][m]["n"]), str(report["support"][m]["parse_failures"])] for m in METRICS]
    lines += _table(["metric", "model", "majority baseline", "n", "parse failures"], rows)
    side = report.get("side_majority_box")
    if side is not None:
        lines += ["", f"Majority box per question and knee side (the side from each volume_id; a baseline that still "
                  f"looks at no image): miou {_fmt(side['miou'])}, acc_iou25 {_fmt(side['acc_iou25'])}, acc_iou50 "
                  f"{_fmt(side['acc_iou50'])}. A model given each knee in one side's frame (`data.canonical_side`) "
                  "matches it by writing one box per question; only a margin over it shows localization."]
    lines += ["", "n counts references for diag_exact and parse_fail_severity, (reference, field) pairs for "
              "diag_field, balanced_acc and qwk (fields with grades 0-3 only), and references with a box for "
              "the IoU metrics and parse_fail_box.", "", "## Input", ""]
    lines += _table(["count", "value"], [[k.replace("_", " "), str(v)] for k, v in c.items()])
    if report["input_issues"]:
        lines += ["", f"First input problems ({len(report['input_issues'])} listed):", ""]
        lines += [f"- {msg}" for msg in report["input_issues"]]
    for key, title in _BREAKDOWN_TITLES:
        lines += ["", f"## By {title}", "", "Each cell: model (majority baseline).", ""]
        maj = report[f"majority_{key}"]
        rows = [[name, str(vals["n"]), *(f"{_fmt(vals[m])} ({_fmt(maj[name][m])})" for m in _ACCURACIES),
                 _fmt(vals["parse_fail_severity"])] for name, vals in report[key].items()]
        lines += _table([title, "n", *_ACCURACIES, "parse_fail_severity"], rows)
    lines += _box_error_lines(report.get("box_errors"))
    if report["confusion"]:
        lines += ["", "## Confusion matrices (fields graded 0-3; rows: reference grade, columns: prediction)", ""]
        for family, cm in report["confusion"].items():
            lines += [f"**{family}**", ""]
            lines += _table(["ref \\ pred", *cm["labels"]],
                            [[lab, *map(str, row)] for lab, row in zip(cm["labels"], cm["matrix"])])
            lines.append("")
    if plot_files:
        lines += ["", "## Plots", ""] + [f"![{Path(f).stem}]({f})" for f in plot_files]
    return "\n".join(lines) + "\n"


def _box_error_lines(errors: Optional[dict]) -> list[str]:
    """report.md's per-axis box error table (``metrics.box_axis_errors``), each cell "model (majority)"."""
    if not errors or not errors["model"]["n"]:
        return []
    model, majority = errors["model"], errors["majority_baseline"]
    axes = [k for k in model if k != "n"]
    rows = [[axis, *(f"{_fmt(model[axis][q])} ({_fmt(majority.get(axis, {}).get(q))})" for q in BOX_AXIS_ERRORS)]
            for axis in axes]
    return ["", "## Box errors per axis", "",
            f"Voxels, prediction minus reference, over the {model['n']} references answered with a box; each cell: "
            "model (majority baseline). tracking: correlation, within each question type and knee side, of predicted "
            "and reference box centres across volumes (does the box follow the anatomy); spread_ratio: how far the "
            "predicted centres move between volumes relative to the reference centres (0: one box per question).",
            "", *_table(["axis", *BOX_AXIS_ERRORS], rows)]


def write_per_sample(path: str | os.PathLike, rows: list[dict]) -> None:
    """One JSON object per line, written atomically.

    All rows are encoded in one call (about twice as fast as a call per row for 100k rows) and then split
    at the row boundaries ``}, {"sample_id": ``. That text occurs nowhere else when every row starts with
    ``sample_id`` and holds no list of objects (a quote inside a string value is escaped); the line count
    is checked, and anything else falls back to encoding row by row.
    """
    text = ""
    if rows:
        text = _ENCODER.encode(rows)[1:-1].replace('}, {"sample_id": ', '}\n{"sample_id": ') + "\n"
        if text.count("\n") != len(rows):
            text = "".join(_ENCODER.encode(r) + "\n" for r in rows)
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _confusion_mosaic(report: dict, cols: int = 4) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """All confusion matrices, row-normalized, tiled into one image plus each block's (x, y, title).

    Gutters and rows of grades no reference has are NaN (drawn blank). One image in one Axes draws far
    faster than an Axes per family, which keeps default plotting cheap.
    """
    families = list(report["confusion"].items())
    g, c = np.asarray(families[0][1]["matrix"]).shape  # (grades, grades + 1 "missing" column)
    cols = min(cols, len(families))
    rows = -(-len(families) // cols)
    # One title row above each block, one gutter row below (predicted-grade ticks) and one gutter column on
    # its left (reference-grade ticks).
    cell_h, cell_w = g + 2, c + 1
    img = np.full((rows * cell_h, cols * cell_w), np.nan)
    titles = []
    for k, (family, cm) in enumerate(families):
        m = np.asarray(cm["matrix"], dtype=np.float64)
        r0, c0 = (k // cols) * cell_h + 1, (k % cols) * cell_w + 1
        rows_n = m.sum(axis=1, keepdims=True)
        img[r0:r0 + g, c0:c0 + c] = np.where(rows_n > 0, m / np.maximum(rows_n, 1), np.nan)
        titles.append((c0 + (c - 1) / 2, r0 - 0.75, family.replace(" / ", "\n")))
    return img, titles


def write_plots(out_dir: Path, report: dict, iou: np.ndarray, majority_iou: np.ndarray) -> list[Path]:
    """Per-category bars (model vs majority), IoU histogram, confusion matrices; returns the PNG paths
    (the last two only when some reference has a box / a field graded 0-3).

    Kept cheap on purpose (fixed margins instead of a layout engine, one image for all confusion
    matrices): plots are on by default and the whole score run has a time budget.
    """
    # The object-oriented API (no pyplot): no global figure state and a lighter import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def save(fig: Figure, name: str) -> Path:
        FigureCanvasAgg(fig)
        path = out_dir / PLOT_FILES[name]
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80)
        return path

    written = [save(per_category_figure(report), "per_category")]

    if iou.size:
        fig = Figure(figsize=(6, 4))
        fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.9)
        ax = fig.subplots()
        bins = np.linspace(0, 1, 21)
        ax.hist(iou, bins=bins, label=f"model (mIoU {_fmt(report['overall']['miou'])})")
        ax.hist(majority_iou, bins=bins, histtype="step", linewidth=2,
                label=f"majority baseline (mIoU {_fmt(report['majority_baseline']['miou'])})")
        ax.set(xlabel="3D IoU", ylabel="references", title=f"IoU over {iou.size} references with a box")
        ax.legend()
        written.append(save(fig, "iou"))

    if report["confusion"]:
        written.append(save(confusion_figure(report), "confusion"))
    return written


def per_category_figure(report: dict) -> "Figure":
    """diag_exact and balanced_acc per category, model beside the majority baseline (two panels with a gap
    wide enough that their x tick labels never touch)."""
    from matplotlib.figure import Figure

    cats = list(report["by_category"])
    fig = Figure(figsize=(11, 0.32 * len(cats) + 1.2))
    fig.subplots_adjust(left=0.19, right=0.98, bottom=0.8 / fig.get_figheight(),
                        top=1 - 0.45 / fig.get_figheight(), wspace=0.12)
    y = np.arange(len(cats))
    ticks = np.linspace(0, 1, 5)
    for ax, metric in zip(fig.subplots(1, 2, sharey=True), ("diag_exact", "balanced_acc")):
        for off, (label, table) in zip((-0.2, 0.2), (("model", report["by_category"]),
                                                     ("majority baseline", report["majority_by_category"]))):
            ax.barh(y + off, [table[c][metric] or 0.0 for c in cats], height=0.4, label=label)
        ax.set(yticks=y, yticklabels=cats, xlim=(0, 1), xlabel=metric, xticks=ticks,
               xticklabels=[f"{t:g}" for t in ticks])
    ax.invert_yaxis()  # shared y: once flips both panels
    fig.legend(*ax.get_legend_handles_labels(), loc="upper center", ncols=2, fontsize=8)
    return fig


MISSING_GRADE_TICK = "-"
"""Tick of the confusion matrices' last column: answers without a grade for the field."""


def confusion_figure(report: dict) -> "Figure":
    """Every field's row-normalised confusion matrix in one image, each block with its title, reference grade
    ticks on its left and predicted grade ticks (then ``MISSING_GRADE_TICK``) below it."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    img, titles = _confusion_mosaic(report)
    fig = Figure(figsize=(img.shape[1] * 0.42 + 1.2, img.shape[0] * 0.42 + 0.6))
    fig.subplots_adjust(left=0.01, right=0.93, bottom=0.08, top=0.99)
    ax = fig.subplots()
    shown = ax.imshow(img, cmap="Blues", vmin=0, vmax=1)
    g, c = np.asarray(next(iter(report["confusion"].values()))["matrix"]).shape
    predicted = [str(k) for k in range(c - 1)] + [MISSING_GRADE_TICK]
    for x, y_, title in titles:
        ax.text(x, y_, title, ha="center", va="center", fontsize=6)
        left, top = x - c / 2, y_ + 0.25
        ax.add_patch(Rectangle((left, top), c, g, fill=False, linewidth=0.5, edgecolor="grey"))
        for k in range(g):  # reference grade of each row
            ax.text(left - 0.15, top + k + 0.5, str(k), ha="right", va="center", fontsize=6, color="dimgrey")
        for k, tick in enumerate(predicted):  # predicted grade of each column
            ax.text(left + k + 0.5, top + g + 0.1, tick, ha="center", va="top", fontsize=6, color="dimgrey")
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, fraction=0.02, pad=0.01, label="fraction of the reference grade")
    fig.text(0.01, 0.02, f"rows: reference grade (blank: no reference has it); columns: predicted grade, "
             f"'{MISSING_GRADE_TICK}': no grade in the answer", fontsize=7)
    return fig


def _plot_worker(conn: Connection) -> None:
    """Child process: import matplotlib at once, then draw the one job it is sent and answer with the paths."""
    import matplotlib.backends.backend_agg  # noqa: F401  (the slow import, done while the parent scores)
    import matplotlib.figure  # noqa: F401
    job = conn.recv()
    if job is None:
        return
    try:
        conn.send(("ok", write_plots(*job)))
    except Exception as e:  # handed to the parent, which raises it with the traceback text
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


class PlotWorker:
    """Draws the plots in a child process started before scoring begins.

    Importing matplotlib and drawing take about a second at 100k references; in a child they overlap
    reading, parsing and writing on the second core. Use as a context manager: leaving it stops the
    child if no job was sent or the job did not finish.
    """

    def __init__(self) -> None:
        # fork starts fastest, but is unsafe once a threaded runtime (torch) lives in this process.
        fork_ok = "fork" in mp.get_all_start_methods() and "torch" not in sys.modules
        ctx = mp.get_context("fork" if fork_ok else "spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_plot_worker, args=(child,), name="reasonknee3d-plots", daemon=True)
        # A spawned child re-runs the caller's main script before it starts the target, unless the script guards
        # its top level with `if __name__ == "__main__":`. A plain script that scores (or runs the demo) would
        # then run a second time in the child, writing into the same folders. The worker needs nothing from the
        # main module (its target lives here), so the child is started with an empty one.
        main = sys.modules["__main__"]
        sys.modules["__main__"] = types.ModuleType("__main__")
        try:
            self._proc.start()
        finally:
            sys.modules["__main__"] = main
        child.close()

    def submit(self, out_dir: Path, report: dict, iou: np.ndarray, majority_iou: np.ndarray) -> None:
        self._conn.send((out_dir, report, iou, majority_iou))

    def result(self) -> list[Path]:
        """The written PNG paths; raises ``RuntimeError`` with the child's traceback if plotting failed."""
        try:
            status, payload = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the plotting process exited with code {self._proc.exitcode} before "
                               f"answering") from None
        if status != "ok":
            raise RuntimeError(f"plotting failed in the child process: {payload}")
        return payload

    def __enter__(self) -> "PlotWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)  # a child still waiting for a job returns at once
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join()
        self._conn.close()


def write_report(out_dir: str | os.PathLike, result: "ScoreResult", plots: bool = True,
                 plotter: Optional[PlotWorker] = None) -> None:
    """Write report.json, report.md, per_sample.jsonl and (unless ``plots`` is False) the PNG plots.

    With a ``plotter`` the plots are drawn by its child process while the other files are written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = (out, result.report, result.iou, result.majority_iou)
    if plots and plotter is not None:
        plotter.submit(*args)
    write_per_sample(out / result.report["per_sample"], result.per_sample)
    if not plots:
        written: list[Path] = []
    else:
        written = plotter.result() if plotter is not None else write_plots(*args)
    for fname in PLOT_FILES.values():  # a plot this run did not draw must not survive from an older run
        if out / fname not in written:
            (out / fname).unlink(missing_ok=True)
    write_text(out / "report.md", render_markdown(result.report, [p.name for p in written]))
    write_json(out / "report.json", result.report)
