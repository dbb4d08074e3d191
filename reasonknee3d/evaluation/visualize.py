"""Box overlay pictures: three orthogonal slices with the predicted and reference boxes drawn in every view.

Used by ``reasonknee3d infer --png`` and the demo report. matplotlib (its object API and Agg canvas: no pyplot
state) is imported inside the functions so importing this module stays cheap.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

from ..boxes import box_center, validate_box
from ..io_utils import atomic_path

# (array axis shown as the slice, axis drawn vertically, axis drawn horizontally, view name)
_VIEWS = ((0, 1, 2, "sagittal (slice {})"), (1, 0, 2, "axial (row {})"), (2, 1, 0, "coronal (col {})"))


def _rect(ax, box: Sequence[int], v_axis: int, h_axis: int, color: str, label: str,
          linestyle: str = "-") -> None:
    from matplotlib.patches import Rectangle
    v0, v1 = box[2 * v_axis], box[2 * v_axis + 1]
    h0, h1 = box[2 * h_axis], box[2 * h_axis + 1]
    # Inclusive voxel indices: the outline runs along voxel edges (index - 0.5 .. index + 0.5).
    ax.add_patch(Rectangle((h0 - 0.5, v0 - 0.5), h1 - h0 + 1, v1 - v0 + 1, fill=False, edgecolor=color,
                           linewidth=1.5, linestyle=linestyle, label=label))


def overlay_slices(shape: Sequence[int], boxes: Sequence[Sequence[int]]) -> list[int]:
    """Slice index per axis: through the centre of the boxes' union (the volume centre without boxes), so
    the views show the region both boxes are about rather than one box only."""
    if not boxes:
        return [int(s) // 2 for s in shape]
    b = np.asarray(boxes, dtype=np.int64)
    union = np.stack([b[:, 0::2].min(axis=0), b[:, 1::2].max(axis=0)], axis=1).reshape(-1)
    return [int(v) for v in np.floor(box_center(union.tolist()))]


def box_overlay_figure(volume: np.ndarray, pred_box: Optional[Sequence[int]] = None,
                       gt_box: Optional[Sequence[int]] = None, title: str = "", answer: str = "") -> "Figure":
    """The overlay figure: three orthogonal slices through the centre of the boxes' union (``overlay_slices``),
    with every box outlined in every view (prediction red, reference green): solid where the shown slice cuts
    the box, dashed (the box's outline projected onto the view) where it does not."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if volume.ndim != 3:
        raise ValueError(f"render_box_overlay expects a 3D volume (S, H, W), got shape {volume.shape}")
    pred = validate_box(pred_box, volume.shape) if pred_box is not None else None
    gt = validate_box(gt_box, volume.shape) if gt_box is not None else None
    drawn = [(b, color, label) for b, color, label in ((gt, "lime", "reference"), (pred, "red", "prediction"))
             if b is not None]
    centre = overlay_slices(volume.shape, [b for b, _, _ in drawn])
    lo, hi = np.percentile(volume, [1, 99.5])

    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    projected = False
    for ax, (s_axis, v_axis, h_axis, name) in zip(axes, _VIEWS):
        img = np.take(volume, centre[s_axis], axis=s_axis)
        if v_axis > h_axis:  # np.take leaves the remaining axes in ascending order
            img = img.T
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        for box, color, label in drawn:
            cut = box[2 * s_axis] <= centre[s_axis] <= box[2 * s_axis + 1]
            projected |= not cut
            _rect(ax, box, v_axis, h_axis, color, label if cut else f"{label} (not in this slice: projected)",
                  "-" if cut else "--")
        ax.set_title(name.format(centre[s_axis]), fontsize=9)
        ax.set_axis_off()
    handles = {}
    for ax in axes:  # one legend entry per kind of outline seen in any view
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncols=len(handles), fontsize=8)
    text = title + ("\n" + "\n".join(textwrap.wrap(answer.replace("\n", " | "), 150)[:4]) if answer else "")
    fig.suptitle(text, fontsize=9, ha="left", x=0.01)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 0.9 if answer else 0.95))
    return fig


def render_box_overlay(volume: np.ndarray, out_png: str | Path, pred_box: Optional[Sequence[int]] = None,
                       gt_box: Optional[Sequence[int]] = None, title: str = "", answer: str = "") -> Path:
    """Write the PNG of ``box_overlay_figure``: three orthogonal slices through the centre of the boxes'
    union, both boxes outlined in every view."""
    fig = box_overlay_figure(volume, pred_box, gt_box, title, answer)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return out_png
