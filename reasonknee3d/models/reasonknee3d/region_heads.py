"""The region-grade model: a volume encoder plus one linear grade head per (question category, grade field).

``train.stage: region_grades`` (``training/region_grades.py``) trains it, and the direct 3D classifier
(``evaluation/classify.py``) predicts with it. Its features for one question are the encoder features of the
grid cells that the question's box overlaps, mean-pooled (the ROI feature); each head maps that feature to
logits over the grades of its field (the union of the grades of the category's questions).

A trained model is stored as an encoder folder (``OUT/encoder/``: ``config.json`` + ``model.safetensors``, what
``model.encoder.init_from`` reads) next to ``OUT/region_heads.safetensors`` and ``OUT/region_heads.json``
(``{"grades": {head key: [grade, ...]}, "hidden_size": ...}``); ``load_region_grade_model`` reads the three back.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...schema import load_schema

Grid = tuple[int, int, int]

HEADS_FILE = "region_heads.json"
HEADS_WEIGHTS = "region_heads.safetensors"
ENCODER_DIR = "encoder"
CROP_CHUNK = 64
"""Crops encoded per encoder call in ``roi: crop``."""


def head_key(category: str, field: str) -> str:
    """ModuleDict key of the head of one (category, field): dots are not allowed in module names."""
    return f"{category}|{field}".replace(".", "_")


def grade_heads() -> dict[str, list[int]]:
    """Head key -> the grades its classes stand for (ascending; the union over the category's questions)."""
    grades: dict[str, set[int]] = defaultdict(set)
    for spec in load_schema().values():
        for f in spec.fields:
            grades[head_key(spec.category, f.key)].update(f.grades)
    return {k: sorted(v) for k, v in sorted(grades.items())}


def box_cells(box: Sequence[int], volume_shape: Sequence[int], grid: Grid) -> list[slice]:
    """Grid cells (one slice per axis) that an inclusive voxel box of a ``volume_shape`` volume overlaps."""
    cells = []
    for a in range(3):
        size, g = volume_shape[a], grid[a]
        lo = min(g - 1, max(0, box[2 * a] * g // size))
        hi = min(g - 1, max(lo, box[2 * a + 1] * g // size))
        cells.append(slice(lo, hi + 1))
    return cells


def roi_pool(features: torch.Tensor, grid: Grid, volume_shape: Sequence[int], rows: Sequence[int],
             boxes: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(R, C)``: the mean of ``features`` (B, D*H*W, C, grid order) over the cells of each box of its row."""
    cube = features.view(features.shape[0], *grid, features.shape[-1])
    return torch.stack([cube[(row, *box_cells(box, volume_shape, grid))].mean(dim=(0, 1, 2))
                        for row, box in zip(rows, boxes)])


class RegionGradeModel(nn.Module):
    """A volume encoder plus one linear grade head per (category, field), over each question's ROI feature.

    ``roi``: ``grid`` pools the whole-volume features of the cells a box overlaps (``roi_pool``, width C);
    ``crop`` resamples the box's part of the volume to ``crop_size``, encodes it and concatenates the mean and the
    max over its patches (width 2C), which is what the 3D model's region look (``region.RegionProjector``) sees.
    ``class_weights``: head key -> per-class cross-entropy weights (``train.pretrain.class_balance``).
    """

    def __init__(self, encoder: nn.Module, heads: dict[str, list[int]], roi: str = "grid",
                 crop_size: Optional[Sequence[int]] = None,
                 class_weights: Optional[dict[str, torch.Tensor]] = None) -> None:
        super().__init__()
        if roi not in ("grid", "crop") or (roi == "crop" and (crop_size is None or len(crop_size) != 3)):
            raise ValueError(f"roi must be 'grid', or 'crop' with a crop_size (S, H, W); got {roi!r}, {crop_size!r}")
        self.encoder = encoder
        self.roi = roi
        self.crop_size = None if crop_size is None else [int(v) for v in crop_size]
        self.grades = {k: list(v) for k, v in heads.items()}
        self.feature_size = encoder.config.hidden_size * (2 if roi == "crop" else 1)
        self.heads = nn.ModuleDict({k: nn.Linear(self.feature_size, len(v)) for k, v in self.grades.items()})
        self.class_weights = dict(class_weights or {})
        self._counts = [0, 0]  # argmax hits, targets since the last log_metrics()

    def roi_features(self, volumes: torch.Tensor, rows: Sequence[int], boxes: Sequence[Sequence[int]]) -> torch.Tensor:
        """``(R, feature_size)``: the feature of each box (inclusive voxels of the model input) of its batch row."""
        if self.roi == "grid":
            features, grid = self.encoder(volumes)
            return roi_pool(features, grid, volumes.shape[2:], rows, boxes)
        from .region import crop_voxel_boxes
        out = []
        for start in range(0, len(rows), CROP_CHUNK):  # bounds the activations when a batch has many questions
            index = torch.as_tensor(list(rows[start:start + CROP_CHUNK]), dtype=torch.long, device=volumes.device)
            crops = crop_voxel_boxes(volumes.index_select(0, index), boxes[start:start + CROP_CHUNK], self.crop_size)
            features, _ = self.encoder(crops.to(volumes.dtype))
            out.append(torch.cat([features.mean(dim=1), features.amax(dim=1)], dim=-1))
        return torch.cat(out)

    def forward(self, volumes: torch.Tensor, rois: list[tuple[int, list[int]]],
                targets: list[tuple[int, str, int]]) -> dict[str, Any]:
        """``rois``: (batch row, box in input voxels); ``targets``: (roi index, head key, class index).

        Returns ``loss``: the (class-weighted) cross-entropy summed over the targets / their number.
        """
        pooled = self.roi_features(volumes, [r for r, _ in rois], [b for _, b in rois])
        by_head: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for roi, key, cls in targets:
            by_head[key].append((roi, cls))
        losses, correct = [], 0
        for key, pairs in by_head.items():
            idx = torch.tensor([p[0] for p in pairs], device=pooled.device)
            cls = torch.tensor([p[1] for p in pairs], device=pooled.device)
            logits = self.heads[key](pooled[idx]).float()
            weight = self.class_weights.get(key)
            weight = None if weight is None else weight.to(logits.device)
            losses.append(F.cross_entropy(logits, cls, weight=weight, reduction="sum"))
            correct += int((logits.argmax(-1) == cls).sum())
        # Heads without a target in this batch still take part (times zero), so that every parameter gets a
        # gradient on every step, as DDP without find_unused_parameters requires.
        unused = [p.sum() for key, head in self.heads.items() if key not in by_head for p in head.parameters()]
        loss = torch.stack(losses).sum() / max(1, len(targets)) + 0.0 * sum(unused, pooled.new_zeros(()))
        self._counts[0] += correct
        self._counts[1] += len(targets)
        return {"loss": loss}

    def log_metrics(self) -> dict[str, float]:
        """Training accuracy of the heads' argmax over the targets seen since the last call (for the log)."""
        hits, n = self._counts
        self._counts = [0, 0]
        return {"grade_accuracy": hits / n} if n else {}

    def describe(self) -> dict[str, Any]:
        """What ``region_heads.json`` records besides the grades, so that the model can be rebuilt."""
        return {"hidden_size": self.encoder.config.hidden_size, "roi": self.roi, "crop_size": self.crop_size}


def grade_class_weights(targets: Sequence[tuple[str, int]], heads: dict[str, list[int]],
                        power: float) -> dict[str, torch.Tensor]:
    """Per head, class weights ``freq^-power`` over the ``(head key, class index)`` training targets, scaled so
    that their mean over the targets is 1; a class never seen gets the largest seen class's weight."""
    counts: dict[str, torch.Tensor] = {k: torch.zeros(len(v), dtype=torch.float64) for k, v in heads.items()}
    for key, cls in targets:
        counts[key][cls] += 1
    out = {}
    for key, c in counts.items():
        if c.sum() == 0 or power == 0:
            continue
        seen = c > 0
        w = torch.zeros_like(c)
        w[seen] = (c[seen] / c.sum()) ** -power
        w[~seen] = w[seen].max()
        w = w / ((w * c).sum() / c.sum())
        out[key] = w.float()
    return out


def is_region_grades_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is the output folder of ``train.stage: region_grades`` (encoder folder and heads)."""
    folder = Path(path)
    return (folder / HEADS_FILE).is_file() and (folder / ENCODER_DIR / "config.json").is_file()


def load_region_grade_model(path: str | os.PathLike) -> RegionGradeModel:
    """The trained ``RegionGradeModel`` of a region_grades output folder, in eval mode, on the CPU.

    Errors name the folder and the file or tensor that does not fit (missing files, heads of another width,
    a head whose class count is not its grade list's length).
    """
    from safetensors.torch import load_file

    from .encoders.base import ENCODERS, encoder_config

    folder = Path(path)
    if not is_region_grades_dir(folder):
        raise FileNotFoundError(f"{folder}: not a region_grades output folder (expected {ENCODER_DIR}/config.json, "
                                f"{HEADS_FILE} and {HEADS_WEIGHTS}, as train.stage region_grades writes)")
    enc_dir = folder / ENCODER_DIR
    raw = json.loads((enc_dir / "config.json").read_text(encoding="utf-8"))
    config = encoder_config(raw)
    encoder = ENCODERS[config.encoder_type][1].from_pretrained(enc_dir)
    try:
        meta = json.loads((folder / HEADS_FILE).read_text(encoding="utf-8"))
        grades = {str(k): [int(g) for g in v] for k, v in meta["grades"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{folder / HEADS_FILE}: expected {{\"grades\": {{head key: [grade, ...]}}, ...}} "
                         f"({type(err).__name__}: {err})") from None
    weights_path = folder / HEADS_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: the heads' weights are missing")
    roi = str(meta.get("roi", "grid"))  # folders written before the crop mode pooled the grid
    crop = meta.get("crop_size")
    try:
        model = RegionGradeModel(encoder, grades, roi=roi, crop_size=crop)
    except ValueError as err:
        raise ValueError(f"{folder / HEADS_FILE}: {err}") from None
    weights = load_file(str(weights_path))
    own = model.heads.state_dict()
    missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or extra:
        raise ValueError(f"{weights_path}: head tensors missing {missing[:4]} / not in {HEADS_FILE} {extra[:4]}")
    for key, value in own.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise ValueError(f"{weights_path}: {key} has shape {tuple(weights[key].shape)}, expected "
                             f"{tuple(value.shape)} (encoder width {encoder.config.hidden_size}, grades of "
                             f"{HEADS_FILE})")
    model.heads.load_state_dict(weights)
    return model.eval()
