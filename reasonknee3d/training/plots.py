"""Loss curves from a run's tensorboard event files (EventAccumulator -> matplotlib, Agg backend).

A resumed run leaves one event file per session; they are read oldest first and a later value for
the same step replaces an earlier one, so the curve is that of the run as it finally went.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ..io_utils import atomic_path


def read_scalars(run_dir: str | os.PathLike, tag: str = "train/loss") -> list[tuple[int, float]]:
    """``(step, value)`` pairs of ``tag`` from every event file under ``run_dir``, sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"{run_dir}: no tensorboard event files (was train.report_to tensorboard?)")
    by_step: dict[int, float] = {}
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0 keeps every point
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            by_step.update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
    if not by_step:
        raise ValueError(f"{run_dir}: no scalar {tag!r} in {len(files)} event file(s)")
    return sorted(by_step.items())


def plot_loss_curves(runs: Mapping[str, str | os.PathLike], out_png: str | os.PathLike,
                     tag: str = "train/loss") -> Path:
    """One PNG with the ``tag`` curve of each run (label -> run folder); written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, run_dir in runs.items():
        steps, values = zip(*read_scalars(run_dir, tag))
        ax.plot(steps, values, marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(tag)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out_png
