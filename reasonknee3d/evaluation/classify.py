"""The direct 3D classifier: a region_grades model grades each question from its box, with no language model.

    reasonknee3d predict --model RG_DIR --data DIR --split test --out P.jsonl [--boxes reference|BOXES.jsonl]

``RG_DIR`` is what ``train.stage: region_grades`` writes (``models/reasonknee3d/region_heads.py``). For each
sample the encoder runs once per volume (every question of a volume shares that forward), the features of the grid
cells that the sample's box overlaps are mean-pooled, and each of the question's fields takes the most probable
grade of its head among the grades that field allows. The answer is written in the package's format
(``answer.format_answer``: the template reasoning of those grades, a ``Location:`` line with the box used, the
``Final diagnosis:`` JSON), so ``reasonknee3d score`` reports it like any model and its IoU is that box's.

Where the box comes from (``boxes``):

- ``"reference"``: the release's box (an oracle for localization: its IoU is 1; report it apart);
- a predictions JSONL (e.g. the 3D-native model's): the box parsed from that sample's output. A sample with no
  row there or no parsable box takes the per-question median box of the train split (the majority baseline's
  box) and is counted; one whose question has no box at all in the train split is pooled over the whole volume.

A question without a reference box (no region) is pooled over the whole volume and written without a box, as a
model's answer to it has none. The counts of each box source are in the result (``box_sources``).

Volumes are read from the preprocessing cache of the region_grades run's ``data:`` settings (its ``config.yaml``),
filled first when needed. Rows are appended through ``predictions_io`` (a rerun skips what is done), and samples
that cannot be used are listed in ``<out stem>.skipped.jsonl`` as ``predict`` does.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..answer import format_answer
from ..boxes import clip_boxes
from ..data.release import Skipped, write_skipped
from ..models.reasonknee3d.region_heads import RegionGradeModel, head_key, is_region_grades_dir
from ..parsing import parse_output
from ..prompts import reasoning_steps
from ..schema import QuestionSpec, get_question
from .predict import PredictResult, _left_out, skipped_path_for
from .predictions_io import PredictionWriter, read_predictions

logger = logging.getLogger(__name__)

REFERENCE_BOXES = "reference"
"""``boxes`` value: use the release's boxes."""

BOX_SOURCES = ("reference", "predictions", "median_train_box", "whole_volume")
"""Where a sample's box came from: the release, the boxes file, the fallback median train box, or none (the whole
volume is pooled)."""

__all__ = ["REFERENCE_BOXES", "BOX_SOURCES", "ClassifyResult", "RegionClassifier", "classify", "is_region_grades_dir",
           "load_region_classifier", "prediction_boxes", "median_train_boxes"]


@dataclass
class ClassifyResult(PredictResult):
    """``PredictResult`` plus how many written samples took their box from each source (``BOX_SOURCES``)."""

    box_sources: dict[str, int] = field(default_factory=dict)


@dataclass
class RegionClassifier:
    """A loaded region_grades folder: the model and the preprocessing its encoder was trained with."""

    model: RegionGradeModel
    prep: Any
    """``data.transforms.PreprocessConfig`` of the run's ``config.yaml``."""
    folder: Path

    @torch.no_grad()
    def grade(self, volumes: torch.Tensor, rois: Sequence[tuple[int, Optional[Sequence[int]]]],
              specs: Sequence[QuestionSpec]) -> list[dict[str, int]]:
        """Grades of each roi: ``rois`` are (batch row, box in model-input voxels or None for the whole volume),
        ``specs`` their questions; each field's grade is its head's most probable grade among those it allows."""
        device = next(self.model.parameters()).device
        shape = tuple(volumes.shape[2:])
        whole = [0, shape[0] - 1, 0, shape[1] - 1, 0, shape[2] - 1]
        pooled = self.model.roi_features(volumes.to(device=device, dtype=torch.float32), [r for r, _ in rois],
                                         [whole if b is None else b for _, b in rois])
        out = []
        for feature, spec in zip(pooled, specs):
            severity = {}
            for f in spec.fields:
                key = head_key(spec.category, f.key)
                if key not in self.model.heads:
                    raise ValueError(f"{self.folder}: no grade head {key!r} for question {spec.question_id} "
                                     f"(heads: {sorted(self.model.heads)[:6]} ...)")
                logits = self.model.heads[key](feature).float()
                classes = self.model.grades[key]
                allowed = [i for i, g in enumerate(classes) if g in f.grades]
                if not allowed:
                    raise ValueError(f"{self.folder}: head {key!r} has grades {classes}, none of them allowed for "
                                     f"field {f.key!r} of question {spec.question_id} ({list(f.grades)})")
                best = max(allowed, key=lambda i: float(logits[i]))
                severity[f.key] = int(classes[best])
            out.append(severity)
        return out


def load_region_classifier(path: str | os.PathLike, images: Optional[str | os.PathLike] = None,
                           cache_dir: Optional[str | os.PathLike] = None) -> RegionClassifier:
    """Load a region_grades output folder (encoder, heads, and the ``data:`` settings of its ``config.yaml``).

    ``images`` / ``cache_dir``: where volumes and the cache are for this run (the run's own are not reused)."""
    from ..families import load_experiment_config
    from ..models.reasonknee3d.region_heads import load_region_grade_model

    folder = Path(path)
    model = load_region_grade_model(folder)
    config = folder / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{config}: missing; the region_grades run writes its experiment config there, "
                                f"and the classifier needs its data: section (the encoder's preprocessing)")
    exp = load_experiment_config(config)
    prep = dataclasses.replace(exp.data, images=None if images is None else str(images),
                               cache_dir=None if cache_dir is None else str(cache_dir))
    return RegionClassifier(model=model, prep=prep, folder=folder)


def prediction_boxes(path: str | os.PathLike, samples: Sequence[Any]) -> dict[str, list[int]]:
    """Sample id -> the box parsed from that sample's output in the predictions file ``path`` (voxels of the
    stored volume, as written), for the ``samples`` (``data.release.Sample``) that have one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--boxes {path}: no such predictions file (expected 'reference' or a predictions "
                                f"JSONL of {{\"sample_id\", \"output\"}} rows)")
    by_id = {s.sample_id: s for s in samples}
    out: dict[str, list[int]] = {}
    for row in read_predictions(path):
        sample = by_id.get(row["sample_id"])
        text = row.get("output")
        if sample is None or not isinstance(text, str):
            continue
        box = parse_output(text, get_question(sample.question_id)).box
        if box is not None:
            out[sample.sample_id] = _int_box(box)
    return out


def median_train_boxes(data_dir: str | os.PathLike, images: Optional[str | os.PathLike] = None) -> dict[int, list[int]]:
    """Question id -> the per-coordinate median of its train-split reference boxes (the majority baseline's box)."""
    from ..data.release import iter_samples
    from .metrics import majority_boxes

    boxed = [s for s in iter_samples(data_dir, "train", [], images=images) if s.box is not None]
    if not boxed:
        return {}
    return majority_boxes(np.array([s.question_id for s in boxed]), np.array([s.box for s in boxed]))


def _int_box(box: Sequence[Any]) -> list[int]:
    return [int(v) for v in np.rint(np.asarray(box, dtype=np.float64)).astype(np.int64)]


@torch.no_grad()
def classify(model_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str, out: str | os.PathLike,
             boxes: str | os.PathLike = REFERENCE_BOXES, batch_size: int = 4, limit: Optional[int] = None,
             images: Optional[str | os.PathLike] = None,
             cache_dir: Optional[str | os.PathLike] = None) -> ClassifyResult:
    """Grade each sample of ``split`` (the first ``limit`` ones) with the region_grades model in ``model_dir``
    and append the answers to ``out``; ``batch_size`` volumes per encoder forward. See the module docstring."""
    from ..data.cache import VolumeCache, preprocess_release
    from ..data.release import cache_root, iter_samples

    if batch_size < 1 or (limit is not None and limit < 0):
        raise ValueError(f"batch_size must be >= 1 (got {batch_size}) and limit >= 0 (got {limit})")
    start = time.perf_counter()
    clf = load_region_classifier(model_dir, images, cache_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clf.model.to(device)

    unusable: list[Skipped] = []
    samples = list(iter_samples(data_dir, split, unusable, images=images))
    cache = VolumeCache(cache_root(data_dir, cache_dir) / "volumes", clf.prep)
    if not all(cache.has(s.image_path) for s in samples):
        preprocess_release(data_dir, clf.prep, splits=[split], cache_dir=cache.dir)
    kept = [s for s in samples if cache.has(s.image_path)]
    wanted_ids, skipped = _left_out(data_dir, split, kept, limit, images, cache_root(data_dir, cache_dir))
    wanted = set(wanted_ids)

    use_reference = os.fspath(boxes) == REFERENCE_BOXES
    parsed = {} if use_reference else prediction_boxes(boxes, kept)
    medians = {} if use_reference else median_train_boxes(data_dir, images)
    sources: Counter[str] = Counter()
    written = 0
    with PredictionWriter(out) as writer:
        skipped = [sk for sk in skipped if sk.item not in writer.done]
        todo = [s for s in kept if s.sample_id in wanted and s.sample_id not in writer.done]
        already = sum(1 for s in kept if s.sample_id in wanted and s.sample_id in writer.done)
        by_volume: dict[Path, list[Any]] = defaultdict(list)
        for s in todo:
            by_volume[s.image_path].append(s)
        volumes = list(by_volume)
        for first in range(0, len(volumes), batch_size):
            chunk = volumes[first:first + batch_size]
            tensors, rois, specs, rows = [], [], [], []
            for image_path in chunk:
                try:
                    volume, meta = cache.read_tensor(image_path)  # (1, S, H, W) float16
                except Exception as err:  # noqa: BLE001 - an unreadable cache entry skips that volume's samples
                    reason = f"cached volume of {image_path} unreadable: {type(err).__name__}: {err}"
                    skipped += [Skipped(s.sample_id, reason) for s in by_volume[image_path]]
                    logger.warning("classify: skipped %d samples: %s", len(by_volume[image_path]), reason)
                    continue
                row = len(tensors)
                tensors.append(volume)
                orig_shape = tuple(int(v) for v in meta["orig_shape"])
                for s in by_volume[image_path]:
                    box, source = _box_for(s, use_reference, parsed, medians)
                    model_box = None
                    if box is not None:
                        box = [int(v) for v in clip_boxes(box, orig_shape)]  # a written box may leave the volume
                        # Into the cached volume's frame (mirror, recentre offset).
                        model_box = cache.frame(s.image_path, meta, s.knee_side).box_to_model(box)
                    rois.append((row, model_box))
                    specs.append(get_question(s.question_id))
                    rows.append((s, box, source))
            if not tensors:
                continue
            grades = clf.grade(torch.stack(tensors), rois, specs)
            for (s, box, source), spec, severity in zip(rows, specs, grades):
                text = format_answer(spec, reasoning_steps(spec, severity), box, severity)
                if writer.write({"sample_id": s.sample_id, "question_id": s.question_id, "output": text}):
                    written += 1
                    sources[source] += 1
    if sources["median_train_box"]:
        logger.warning("classify: %d samples had no parsable box in %s and took the median train box",
                       sources["median_train_box"], boxes)
    result = ClassifyResult(out=Path(out), n_split=len(wanted_ids), n_skipped=already, n_written=written,
                            seconds=time.perf_counter() - start, skipped=skipped,
                            skipped_path=write_skipped(skipped_path_for(out), skipped),
                            box_sources={k: sources[k] for k in BOX_SOURCES})
    logger.info("classify: %s", result)
    return result


def _box_for(sample: Any, use_reference: bool, parsed: dict[str, list[int]],
             medians: dict[int, list[int]]) -> tuple[Optional[list[int]], str]:
    """The box a sample is graded in (stored-volume voxels; None: the whole volume, no box written) and its
    source (``BOX_SOURCES``)."""
    if sample.box is None:
        return None, "whole_volume"
    if use_reference:
        return list(sample.box), "reference"
    if sample.sample_id in parsed:
        return parsed[sample.sample_id], "predictions"
    median = medians.get(sample.question_id)
    if median is not None:
        return list(median), "median_train_box"
    return None, "whole_volume"
