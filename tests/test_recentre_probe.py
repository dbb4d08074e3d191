"""scripts/recentre_probe.py: the centroid by hand, and the probe on a small synthetic release."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from reasonknee3d.data.synth import write_synthetic_release

SCRIPT = Path(__file__).parents[1] / "scripts" / "recentre_probe.py"
_spec = importlib.util.spec_from_file_location("recentre_probe", SCRIPT)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_intensity_centroid_by_hand() -> None:
    v = np.zeros((10, 10, 10))
    v[0:4] = 1.0        # slices 0-3 bright: centroid 1.5 along axis 0, the grid's middle (4.5) on the others
    v[0, 0, 0] = 50.0   # one voxel in 1,000 is above the 99.5th percentile (1.0): clipped to it before weighing
    assert probe.intensity_centroid(v) == pytest.approx([1.5, 4.5, 4.5])
    with pytest.raises(ValueError, match="no centroid"):
        probe.intensity_centroid(np.zeros((2, 2, 2)))


def test_probe_runs_on_a_synthetic_release(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_synthetic_release(tmp_path / "rel", n_volumes=8, shape=(16, 32, 32), seed=1, questions=[1, 2, 30])
    assert probe.main(["--data", str(tmp_path / "rel")]) == 0
    out = capsys.readouterr().out
    assert "corr(intensity centroid, box shift) per axis: slice" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("  ")]
    assert [r[0] for r in rows] == ["as", "re-centred", "re-centred", "re-centred", "re-centred"]
    assert all(0.0 <= float(r[-1]) <= 1.0 for r in rows)
