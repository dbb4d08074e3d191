"""scripts/time_3d_build.py: the real preset's build timed and profiled, at one layer and a quarter of the widths."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "time_3d_build.py"
_spec = importlib.util.spec_from_file_location("time_3d_build", SCRIPT)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


def test_the_build_is_timed_and_profiled(capsys: pytest.CaptureFixture) -> None:
    assert script.main(["--layers", "1", "--scale", "4", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint: " in out and "(built in " in out  # a fresh cache (tests/conftest.py): built here
    build = next(line for line in out.splitlines() if line.startswith("build: "))
    assert float(build.split()[1]) > 0 and "bfloat16" in build and "float32" in build  # LM bf16, encoder fp32
    assert "ncalls" in out and "tottime" in out
