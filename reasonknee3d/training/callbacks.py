"""What the trainer reports while it runs: throughput and data wait, metrics.jsonl, the progress bar.

``ThroughputMeter`` is fed by the trainer around each pull from the data loader; at every logging step
its interval numbers (samples/s over all processes, fraction of wall time spent waiting for batches)
are added to the log record, so tensorboard, ``metrics.jsonl`` and the progress bar all show them.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from ..io_utils import write_jsonl

# Keys of one metrics.jsonl line (those present in the log record; train-end summaries are skipped).
METRIC_KEYS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "samples_per_second", "data_wait_fraction",
               "grade_accuracy", "dice")


class ThroughputMeter:
    """Accumulates data-loader wait time and samples between two ``interval()`` calls."""

    def __init__(self, world_size: int = 1) -> None:
        self.world_size = world_size
        self._start = time.perf_counter()
        self._wait = 0.0
        self._samples = 0

    def record(self, wait_seconds: float, samples: int) -> None:
        """One pull from the data loader took ``wait_seconds`` and delivered ``samples`` (this process)."""
        self._wait += wait_seconds
        self._samples += samples

    def interval(self) -> dict[str, float]:
        """samples_per_second (all processes) and data_wait_fraction since the last call; starts a new window."""
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        out = {"samples_per_second": round(self._samples * self.world_size / elapsed, 4),
               "data_wait_fraction": round(min(self._wait / elapsed, 1.0), 4)}
        self._start, self._wait, self._samples = now, 0.0, 0
        return out


class MetricsJsonlCallback(TrainerCallback):
    """Writes ``metrics.jsonl`` (one line per logging step) in the output folder, on the main process.

    On resume, lines logged after the checkpoint being resumed from are dropped, so the file reads like
    one uninterrupted run. The whole file is rewritten atomically on each log (a few KB per thousand steps).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        self.rows = []
        if state.is_world_process_zero and self.path.exists():
            with open(self.path, encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            self.rows = [r for r in rows if r.get("step", 0) <= state.global_step]

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        record = {**logs, "step": state.global_step}
        self.rows.append({k: record[k] for k in METRIC_KEYS if k in record})
        write_jsonl(self.path, self.rows)


class ProgressBarCallback(ProgressCallback):
    """transformers' tqdm bar (steps and ETA) with loss, learning rate, samples/s and data wait as postfix."""

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.training_bar is None or not logs or "loss" not in logs:
            return
        self.training_bar.set_postfix({
            "loss": f"{logs['loss']:.4f}", "lr": f"{logs.get('learning_rate', 0.0):.2e}",
            "samples/s": f"{logs.get('samples_per_second', 0.0):.2f}",
            "data_wait": f"{logs.get('data_wait_fraction', 0.0):.1%}"}, refresh=False)
