"""The overlay picture is written, and boxes are validated against the volume."""
import numpy as np
import pytest

from reasonknee3d.evaluation.visualize import render_box_overlay


def test_overlay_png(tmp_path):
    vol = np.random.default_rng(0).normal(size=(12, 20, 24)).astype(np.float32)
    out = render_box_overlay(vol, tmp_path / "o.png", pred_box=[2, 6, 3, 9, 4, 12], gt_box=[3, 7, 4, 10, 5, 13],
                             title="q16: patella medial cartilage", answer="Location: ...\nFinal diagnosis: {}")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="does not fit"):
        render_box_overlay(vol, tmp_path / "bad.png", pred_box=[0, 12, 0, 1, 0, 1])
    assert not (tmp_path / "bad.png").exists()
