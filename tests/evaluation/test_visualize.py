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


def _outlines(ax):
    from matplotlib.patches import Rectangle
    return [(p.get_edgecolor()[:3], p.get_linestyle()) for p in ax.patches if isinstance(p, Rectangle)]


def test_both_boxes_are_drawn_in_every_view_even_when_far_apart():
    from reasonknee3d.evaluation.visualize import box_overlay_figure, overlay_slices
    vol = np.random.default_rng(1).normal(size=(20, 30, 40)).astype(np.float32)
    pred, gt = [1, 3, 2, 5, 2, 6], [14, 18, 20, 27, 30, 38]  # disjoint on every axis
    assert overlay_slices(vol.shape, [pred, gt]) == [9, 14, 20]  # the union's centre
    fig = box_overlay_figure(vol, pred_box=pred, gt_box=gt, title="t")
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 3
    for ax in axes:
        outlines = _outlines(ax)
        assert sorted(c for c, _ in outlines) == sorted([(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)])  # red and lime
        assert all(style == "--" for _, style in outlines)  # neither box is cut by the union-centre slices
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["reference (not in this slice: projected)", "prediction (not in this slice: projected)"]


def test_overlapping_boxes_are_solid_where_the_slice_cuts_them():
    from reasonknee3d.evaluation.visualize import box_overlay_figure
    vol = np.random.default_rng(2).normal(size=(12, 20, 24)).astype(np.float32)
    fig = box_overlay_figure(vol, pred_box=[2, 6, 3, 9, 4, 12], gt_box=[3, 7, 4, 10, 5, 13])
    for ax in (ax for ax in fig.axes if ax.images):
        assert [style for _, style in _outlines(ax)] == ["-", "-"]
    only_gt = box_overlay_figure(vol, gt_box=[3, 7, 4, 10, 5, 13])
    assert [len(_outlines(ax)) for ax in only_gt.axes if ax.images] == [1, 1, 1]
