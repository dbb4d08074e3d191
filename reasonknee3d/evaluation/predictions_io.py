"""Resumable predictions JSONL: one ``{"sample_id", "output", ...}`` line per sample, appended as it is made.

Long prediction runs (``predict``, ``zeroshot``) are killed and rerun. Each finished sample is appended
and flushed to disk (fsync) before the next, so a kill loses at most the line being written; a rerun reads
``done_ids`` and skips those samples. A kill can leave a truncated last line: ``done_ids`` ignores it and
``PredictionWriter`` cuts it off before appending, so the file never holds a duplicate or a broken line.
This is the one output written in place instead of atomically: appending is what makes it resumable.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional


def _complete_lines(path: Path) -> tuple[list[bytes], int]:
    """The file's complete (newline-terminated) lines and the byte length they span."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # everything after the last newline is a line cut off by a kill
    return data[:end].splitlines(), end


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a predictions file (a truncated last line is ignored; a broken line elsewhere is an error)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    lines, _ = _complete_lines(path)
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i}: not valid JSON ({e.msg}); expected one prediction object per line")
        if not isinstance(row, dict) or not isinstance(row.get("sample_id"), str):
            raise ValueError(f"{path} line {i}: expected an object with a string 'sample_id', got {line[:80]!r}")
        rows.append(row)
    return rows


def done_ids(path: str | os.PathLike) -> set[str]:
    """Sample ids already written to ``path`` (empty when the file does not exist)."""
    return {row["sample_id"] for row in read_predictions(path)}


class PredictionWriter:
    """Appends prediction rows to a JSONL file, one flushed and fsynced line per call; skips ids already there.

    Use as a context manager. Not thread-safe: call ``write`` from one thread (the runners collect results
    from their worker threads and write them in the main thread).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.done: set[str] = set()
        self._fh: Optional[Any] = None

    def __enter__(self) -> "PredictionWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self.done = done_ids(self.path)
            _, end = _complete_lines(self.path)
            if end != self.path.stat().st_size:
                os.truncate(self.path, end)  # drop the partial line a kill left behind
        self._fh = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def write(self, row: dict[str, Any]) -> bool:
        """Append ``row`` (must have a string ``sample_id``); False when that id was already written."""
        if self._fh is None:
            raise RuntimeError("PredictionWriter.write outside its `with` block")
        sid = row.get("sample_id")
        if not isinstance(sid, str):
            raise ValueError(f"prediction row needs a string 'sample_id', got {sid!r}")
        if sid in self.done:
            return False
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done.add(sid)
        return True

    def write_all(self, rows: Iterable[dict[str, Any]]) -> int:
        """Write each row; returns how many were new."""
        return sum(self.write(r) for r in rows)
