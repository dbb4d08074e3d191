"""Resumable predictions JSONL: one ``{"sample_id", "output", ...}`` line per sample, appended as it is made.

Long prediction runs (``predict``, ``zeroshot``) are killed and rerun. Each finished sample is appended
and flushed to disk (fsync) before the next, so a kill loses at most the line being written; a rerun reads
``done_ids`` and skips those samples. A kill can leave a truncated last line: ``done_ids`` ignores it and
``PredictionWriter`` cuts it off before appending, so the file never holds a duplicate or a broken line.
This is the one output written in place instead of atomically: appending is what makes it resumable.

A writer given ``settings`` (how the rows are made, e.g. ``predict``'s decoding options) keeps them beside the
file in ``<stem>.settings.json`` and refuses to resume a file written with other settings, so one file never
mixes rows of two decodings.
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


def settings_path_for(path: str | os.PathLike) -> Path:
    """Where a writer keeps the settings of a predictions file: ``P.jsonl`` -> ``P.settings.json``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".jsonl") + ".settings.json")


class PredictionWriter:
    """Appends prediction rows to a JSONL file, one flushed and fsynced line per call; skips ids already there.

    Use as a context manager. Not thread-safe: call ``write`` from one thread (the runners collect results
    from their worker threads and write them in the main thread).
    """

    def __init__(self, path: str | os.PathLike, settings: Optional[dict[str, Any]] = None) -> None:
        self.path = Path(path)
        self.settings = None if settings is None else json.loads(json.dumps(settings))  # as it reads back
        self.done: set[str] = set()
        self._fh: Optional[Any] = None

    @property
    def settings_path(self) -> Path:
        return settings_path_for(self.path)

    @staticmethod
    def check_settings(path: str | os.PathLike, settings: Optional[dict[str, Any]],
                       done: Optional[set[str]] = None) -> None:
        """Raise ``ValueError`` when ``path`` holds rows written with settings other than ``settings`` (nothing
        is written; a writer's ``__enter__`` checks the same, so callers can fail before any expensive work).
        ``done``: the file's sample ids when the caller has read them already."""
        path = Path(path)
        side = settings_path_for(path)
        if settings is None or not side.is_file() or not path.is_file():
            return
        settings = json.loads(json.dumps(settings))
        earlier = json.loads(side.read_text(encoding="utf-8"))
        if earlier == settings:
            return
        n = len(done if done is not None else done_ids(path))
        if n:
            diff = {k: (earlier.get(k), settings.get(k)) for k in sorted({*earlier, *settings})
                    if earlier.get(k) != settings.get(k)}
            raise ValueError(f"{path} holds {n} rows written with other settings ("
                             + ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items())
                             + f"; see {side}); resuming would mix them: use another output file, or delete it "
                             "to start over")

    def _check_settings(self) -> None:
        if self.settings is None:
            return
        self.check_settings(self.path, self.settings, self.done)
        if not self.done or not self.settings_path.is_file():
            from ..io_utils import write_json
            write_json(self.settings_path, self.settings)

    def __enter__(self) -> "PredictionWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            self.done = done_ids(self.path)
            _, end = _complete_lines(self.path)
            self._check_settings()
            if end != self.path.stat().st_size:
                os.truncate(self.path, end)  # drop the partial line a kill left behind
        else:
            self._check_settings()
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
