"""Resumable predictions JSONL: truncated last lines, no duplicates, one fsync per row."""
from __future__ import annotations

import json
import os

import pytest

from reasonknee3d.evaluation.predictions_io import PredictionWriter, done_ids, read_predictions


def test_truncated_last_line_is_ignored_then_cut(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"sample_id": "a", "output": "x"}\n{"sample_id": "b", "output": "y"}\n{"sample_id": "c", "out')
    assert done_ids(path) == {"a", "b"}
    with PredictionWriter(path) as w:
        assert w.write({"sample_id": "c", "output": "z"})
        assert not w.write({"sample_id": "a", "output": "again"})  # already there: never duplicated
    rows = read_predictions(path)
    assert [r["sample_id"] for r in rows] == ["a", "b", "c"]
    assert path.read_text().endswith('"z"}\n')


def test_broken_line_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"sample_id": "a"}\nnot json\n{"sample_id": "b"}\n')
    with pytest.raises(ValueError, match="line 2"):
        done_ids(path)
    path.write_text('{"output": "no id"}\n')
    with pytest.raises(ValueError, match="sample_id"):
        done_ids(path)


def test_every_row_is_flushed_and_synced(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd) or real(fd))
    path = tmp_path / "sub" / "p.jsonl"
    assert done_ids(path) == set()
    with PredictionWriter(path) as w:
        assert w.write_all({"sample_id": s, "output": s} for s in "abc") == 3
        # Visible to a reader before the writer closes (what a killed run leaves behind).
        assert done_ids(path) == {"a", "b", "c"}
    assert len(calls) == 3
    with pytest.raises(RuntimeError):
        w.write({"sample_id": "d"})
    with PredictionWriter(path) as w, pytest.raises(ValueError, match="sample_id"):
        w.write({"output": "x"})
    assert json.loads(path.read_text().splitlines()[0]) == {"sample_id": "a", "output": "a"}
