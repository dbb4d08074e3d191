"""Report folder: markdown tables beside the majority baseline, per-sample lines, PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from reasonknee3d.evaluation.metrics import METRICS
from reasonknee3d.evaluation.report import PlotWorker, render_markdown, write_per_sample, write_plots
from reasonknee3d.evaluation.score import Reference, score_predictions

REFS = [Reference("a", 30, {"grade": 2}, [0, 9, 0, 9, 0, 9]), Reference("b", 30, {"grade": 0}, [0, 3, 0, 3, 0, 3]),
        Reference("c", 60, {"Complete Tear": 1, "Associated with BML/cyst at site of insertion or origin": 0,
                            "ACL Repair": 0}, None)]
OUTPUTS = {"a": 'Location: <|box_start|>[0, 9, 0, 9, 0, 4]<|box_end|>\nFinal diagnosis: {"patella superior '
                'osteophyte": {"grade": 2}}', "b": "no idea"}


def test_markdown_puts_each_accuracy_beside_the_majority() -> None:
    report = score_predictions(OUTPUTS, REFS).report
    md = render_markdown(report, ["per_category.png"])
    for metric in METRICS:
        row = next(line for line in md.splitlines() if line.startswith(f"| {metric} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5  # metric, model, majority, n, parse failures
    assert "| diag_exact | 0.333 | 0.667 | 3 | 2 |" in md  # majority: grade 0 for q30 wins the tie, ACL 1/0/0
    assert "| osteophyte | 2 | 0.500 (0.500) |" in md and "| ligament_tendon | 1 |" in md
    for title in ("## By category", "## By structure", "## By compartment", "![per_category](per_category.png)"):
        assert title in md
    assert "–" in md  # no box for ligament questions: shown as a dash, not 0


def test_per_sample_lines_survive_tricky_sample_ids(tmp_path: Path) -> None:
    rows = [{"sample_id": 'x}, {"sample_id": "y', "v": 1}, {"sample_id": "z", "v": [{"nested": 1}, {"k": 2}]},
            {"sample_id": "ü", "v": None}]
    write_per_sample(tmp_path / "p.jsonl", rows)
    lines = (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows
    write_per_sample(tmp_path / "p.jsonl", [])
    assert (tmp_path / "p.jsonl").read_text() == ""


def test_plots_are_pngs(tmp_path: Path) -> None:
    result = score_predictions(OUTPUTS, REFS)
    paths = write_plots(tmp_path, result.report, result.iou, result.majority_iou)
    assert sorted(p.name for p in paths) == ["confusion_ordinal.png", "iou_histogram.png", "per_category.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temporaries left


def test_plot_worker_draws_in_a_child_and_reports_failures(tmp_path: Path) -> None:
    result = score_predictions(OUTPUTS, REFS)
    with PlotWorker() as worker:
        worker.submit(tmp_path, result.report, result.iou, result.majority_iou)
        assert sorted(p.name for p in worker.result()) == ["confusion_ordinal.png", "iou_histogram.png",
                                                           "per_category.png"]
    with PlotWorker() as worker:
        worker.submit(tmp_path, {}, result.iou, result.majority_iou)  # no report keys: KeyError
        with pytest.raises(RuntimeError, match="plotting failed in the child process: KeyError"):
            worker.result()
    with PlotWorker():
        pass  # never given a job: leaving the block stops the child



def test_a_script_without_a_main_guard_runs_once(tmp_path: Path) -> None:
    """The plotting child is spawned once torch is loaded; spawn re-runs the caller's main script unless it is
    guarded, and a plain script that scores would then run twice (once in the child, into the same folders)."""
    import subprocess
    import sys

    script = tmp_path / "plain.py"
    script.write_text(f"""
import torch  # the worker is spawned, not forked, once torch is loaded
from pathlib import Path
from reasonknee3d.evaluation.report import PlotWorker
from reasonknee3d.evaluation.score import Reference, score_predictions
out = Path({str(tmp_path)!r})
with open(out / "runs.txt", "a") as f:
    f.write("ran\\n")
result = score_predictions({OUTPUTS!r}, [Reference("a", 30, {{"grade": 2}}, [0, 9, 0, 9, 0, 9])])
with PlotWorker() as worker:
    worker.submit(out / "plots", result.report, result.iou, result.majority_iou)
    print(len(worker.result()))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3"]
    assert (tmp_path / "runs.txt").read_text() == "ran\n"  # not a second time in the child


def test_per_category_panels_keep_their_x_tick_labels_apart() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from reasonknee3d.evaluation.report import per_category_figure
    fig = per_category_figure(score_predictions(OUTPUTS, REFS).report)
    renderer = FigureCanvasAgg(fig).get_renderer()
    left, right = (ax for ax in fig.axes if ax.get_xlabel())
    assert [t.get_text() for t in left.get_xticklabels()] == ["0", "0.25", "0.5", "0.75", "1"]
    last = left.get_xticklabels()[-1].get_window_extent(renderer)
    first = right.get_xticklabels()[0].get_window_extent(renderer)
    assert last.x1 < first.x0  # "1" of the left panel ends before "0" of the right one starts


def test_confusion_matrices_have_grade_ticks() -> None:
    from reasonknee3d.evaluation.report import MISSING_GRADE_TICK, confusion_figure
    report = score_predictions(OUTPUTS, REFS).report
    fig = confusion_figure(report)
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    n_blocks = len(report["confusion"])
    g = len(next(iter(report["confusion"].values()))["matrix"])
    for k in range(g):  # each block: its reference-grade row tick and predicted-grade column tick
        assert texts.count(str(k)) == 2 * n_blocks
    assert texts.count(MISSING_GRADE_TICK) == n_blocks
