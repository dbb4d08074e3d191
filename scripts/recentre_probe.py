"""Would re-centring each volume on its foreground make the boxes follow the anatomy? A probe without training.

    python scripts/recentre_probe.py --data RELEASE [--train-split train] [--test-split test]

Between scans a knee sits a little elsewhere in the field of view, so the box of one region moves from volume
to volume. A model that writes one box per question and knee side (what the tiny 3D-native model learns, see
docs/results.md) misses by that shift. This script asks whether a statistic as plain as the volume's intensity
centroid already predicts the shift, and what the one-box-per-question answer would score in a frame centred on
it:

- per array axis, over every volume of both splits, the correlation between the volume's intensity centroid
  (intensities clipped at their 99.5th percentile) and the mean deviation of its box centres from the mean
  centre of their (question, knee side) group;
- on the test split, the mean IoU of the majority box per (question, knee side) (per-coordinate median of the
  train split's boxes, rounded down, as the benchmark's majority box) when every box is first moved by its
  volume's centroid offset from the mean centroid (rounded to whole voxels) on the listed axes, and moved back.

Boxes and volumes are in the stored voxel grid, as the release has them.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Sequence

import numpy as np

from reasonknee3d.boxes import iou_3d
from reasonknee3d.constants import AXIS_NAMES
from reasonknee3d.data.frame import intensity_centroid
from reasonknee3d.data.io import load_volume
from reasonknee3d.data.release import Sample, iter_samples
from reasonknee3d.evaluation.metrics import majority_boxes

AXIS_SETS = ((), (0,), (1,), (2,), (0, 1, 2))


def _group(s: Sample) -> tuple[int, str]:
    return s.question_id, s.knee_side


def centroid_correlation(samples: Sequence[Sample], centroids: dict[str, np.ndarray]) -> list[float]:
    """Per axis: corr(volume centroid, mean deviation of the volume's box centres from their group means)."""
    centres = defaultdict(list)
    for s in samples:
        centres[_group(s)].append((s.volume_id, np.asarray(s.box, dtype=np.float64).reshape(3, 2).mean(1)))
    deviation = defaultdict(list)
    for members in centres.values():
        mean = np.mean([c for _, c in members], axis=0)
        for vid, c in members:
            deviation[vid].append(c - mean)
    vids = sorted(deviation)
    shift = np.array([np.mean(deviation[v], axis=0) for v in vids])
    cent = np.array([centroids[v] for v in vids])
    return [float(np.corrcoef(cent[:, a], shift[:, a])[0, 1]) for a in range(3)]


def recentred_majority_iou(train: Sequence[Sample], test: Sequence[Sample], centroids: dict[str, np.ndarray],
                           axes: Sequence[int]) -> float:
    """Mean IoU on ``test`` of the majority box per (question, knee side) in a frame centred on each volume's
    centroid along ``axes`` (none: the plain side-aware majority box)."""
    mean_c = np.mean([centroids[s.volume_id] for s in (*train, *test)], axis=0)

    def offset(s: Sample) -> np.ndarray:
        o = np.zeros(3, dtype=np.int64)
        for a in axes:
            o[a] = int(np.round(centroids[s.volume_id][a] - mean_c[a]))
        return np.repeat(o, 2)

    keys = {g: i for i, g in enumerate(sorted({_group(s) for s in train}))}
    found = majority_boxes(np.array([keys[_group(s)] for s in train]),
                           np.array([np.asarray(s.box) - offset(s) for s in train]))
    scored = [s for s in test if _group(s) in keys]
    true = np.array([s.box for s in scored])
    pred = np.array([np.asarray(found[keys[_group(s)]]) + offset(s) for s in scored])
    return float(np.mean(iou_3d(true, pred)))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="release folder")
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--test-split", default="test")
    args = ap.parse_args(argv)
    train = [s for s in iter_samples(args.data, args.train_split) if s.box is not None]
    test = [s for s in iter_samples(args.data, args.test_split) if s.box is not None]
    paths = {s.volume_id: s.image_path for s in (*train, *test)}
    centroids = {vid: intensity_centroid(load_volume(p)[0]) for vid, p in paths.items()}
    corr = centroid_correlation([*train, *test], centroids)
    print(f"{len(paths)} volumes; corr(intensity centroid, box shift) per axis: "
          + ", ".join(f"{AXIS_NAMES[a]} {c:.3f}" for a, c in enumerate(corr)))
    print(f"test split, {len(test)} boxes: mean IoU of the majority box per (question, knee side)")
    for axes in AXIS_SETS:
        label = "as stored" if not axes else "re-centred on " + ", ".join(AXIS_NAMES[a] for a in axes)
        print(f"  {label:<32} {recentred_majority_iou(train, test, centroids, axes):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
