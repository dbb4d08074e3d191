"""The direct 3D classifier's counterpart of ``grade_probe.py``: per question category, the ROC AUC of its
"grade > 0" score for the first field, in the reference boxes.

    python scripts/classifier_auc.py --model RG_DIR --data RELEASE [--split test]

``RG_DIR`` is a region_grades output folder. The score is 1 - P(grade 0) of the first field's head on the
features pooled in the reference box (samples without a box are left out), so the AUC compares directly with
``grade_probe.py``'s on a 3D-native checkpoint whose encoder started from the same folder.
"""
from __future__ import annotations

import argparse
import collections
import sys
from typing import Optional, Sequence

import torch

from grade_probe import roc_auc  # same folder
from reasonknee3d.data.cache import VolumeCache, preprocess_release
from reasonknee3d.data.release import cache_root, iter_samples
from reasonknee3d.evaluation.classify import load_region_classifier
from reasonknee3d.models.reasonknee3d.region_heads import head_key
from reasonknee3d.schema import get_question


@torch.no_grad()
def classifier_auc(model_dir: str, data_dir: str, split: str = "test") -> dict[str, dict[str, object]]:
    """``{category: {"n", "abnormal", "auc"}}`` of the first field's "grade > 0" score in the reference boxes."""
    clf = load_region_classifier(model_dir)
    samples = [s for s in iter_samples(data_dir, split) if s.box is not None]
    cache = VolumeCache(cache_root(data_dir) / "volumes", clf.prep)
    if not all(cache.has(s.image_path) for s in samples):
        preprocess_release(data_dir, clf.prep, splits=[split], cache_dir=cache.dir)
    by_volume = collections.defaultdict(list)
    for s in samples:
        by_volume[s.image_path].append(s)
    rows = collections.defaultdict(list)
    for path, group in by_volume.items():
        volume, meta = cache.read_tensor(path)
        boxes = [cache.frame(path, meta, s.knee_side).box_to_model(s.box) for s in group]
        pooled = clf.model.roi_features(volume[None].float(), [0] * len(group), boxes)
        for s, feature in zip(group, pooled):
            spec = get_question(s.question_id)
            field = spec.fields[0].key
            key = head_key(spec.category, field)
            p = torch.softmax(clf.model.heads[key](feature).float(), -1)
            rows[spec.category].append((int(s.severity[field] != 0), 1.0 - float(p[clf.model.grades[key].index(0)])))
    return {c: {"n": len(r), "abnormal": sum(y for y, _ in r), "auc": roc_auc([y for y, _ in r], [v for _, v in r])}
            for c, r in sorted(rows.items())}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args(argv)
    print(f"{'category':28s} {'n':>5s} {'grade>0':>8s} {'AUC':>6s}")
    for category, r in classifier_auc(args.model, args.data, args.split).items():
        auc = "-" if r["auc"] is None else f"{r['auc']:.3f}"
        print(f"{category:28s} {r['n']:5d} {r['abnormal']:8d} {auc:>6s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
