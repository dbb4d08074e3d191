"""Atomic writers leave either the old file or the new one, never a partial file."""
import pytest

from reasonknee3d.io_utils import atomic_open, write_jsonl


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"a": 1}])
    with pytest.raises(RuntimeError):
        with atomic_open(p) as fh:
            fh.write("partial")
            raise RuntimeError("boom")
    assert p.read_text() == '{"a": 1}\n'
    assert [x.name for x in tmp_path.iterdir()] == ["out.jsonl"]
