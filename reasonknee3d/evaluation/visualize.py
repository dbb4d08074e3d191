"""Box overlay pictures: three orthogonal slices through a box centre with predicted / reference boxes.

Used by ``reasonknee3d infer --png`` and the demo report. matplotlib (Agg) is imported inside the function
so importing this module stays cheap.
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..boxes import box_center, validate_box
from ..io_utils import atomic_path

# (array axis shown as the slice, axis drawn vertically, axis drawn horizontally, view name)
_VIEWS = ((0, 1, 2, "sagittal (slice {})"), (1, 0, 2, "axial (row {})"), (2, 1, 0, "coronal (col {})"))


def _rect(ax, box: Sequence[int], v_axis: int, h_axis: int, color: str, label: str) -> None:
    from matplotlib.patches import Rectangle
    v0, v1 = box[2 * v_axis], box[2 * v_axis + 1]
    h0, h1 = box[2 * h_axis], box[2 * h_axis + 1]
    # Inclusive voxel indices: the outline runs along voxel edges (index - 0.5 .. index + 0.5).
    ax.add_patch(Rectangle((h0 - 0.5, v0 - 0.5), h1 - h0 + 1, v1 - v0 + 1, fill=False, edgecolor=color,
                           linewidth=1.5, label=label))


def render_box_overlay(volume: np.ndarray, out_png: str | Path, pred_box: Optional[Sequence[int]] = None,
                       gt_box: Optional[Sequence[int]] = None, title: str = "", answer: str = "") -> Path:
    """Write a PNG with the three orthogonal slices through the centre of the predicted box (else the
    reference box, else the volume), each box outlined (prediction red, reference green)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if volume.ndim != 3:
        raise ValueError(f"render_box_overlay expects a 3D volume (S, H, W), got shape {volume.shape}")
    pred = validate_box(pred_box, volume.shape) if pred_box is not None else None
    gt = validate_box(gt_box, volume.shape) if gt_box is not None else None
    ref = pred if pred is not None else gt
    centre = box_center(ref).tolist() if ref is not None else [s // 2 for s in volume.shape]
    lo, hi = np.percentile(volume, [1, 99.5])

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.8))
    for ax, (s_axis, v_axis, h_axis, name) in zip(axes, _VIEWS):
        img = np.take(volume, centre[s_axis], axis=s_axis)
        if v_axis > h_axis:  # np.take leaves the remaining axes in ascending order
            img = img.T
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect="auto", interpolation="nearest")
        for box, color, label in ((gt, "lime", "reference"), (pred, "red", "prediction")):
            if box is not None and box[2 * s_axis] <= centre[s_axis] <= box[2 * s_axis + 1]:
                _rect(ax, box, v_axis, h_axis, color, label)
        ax.set_title(name.format(centre[s_axis]), fontsize=9)
        ax.set_axis_off()
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, loc="lower left", fontsize=8)
    text = title + ("\n" + "\n".join(textwrap.wrap(answer.replace("\n", " | "), 150)[:4]) if answer else "")
    fig.suptitle(text, fontsize=9, ha="left", x=0.01)
    fig.tight_layout(rect=(0, 0, 1, 0.9 if answer else 0.95))
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out_png
