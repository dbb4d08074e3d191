"""``train.stage: region_grades``: pretrain the 3D model's volume encoder to grade what lies in each reference box.

Every graded question with a box supervises its (question category, grade field) heads from the ROI feature of
its box (``models/reasonknee3d/region_heads.py``): with ``train.pretrain.roi: crop`` (the default) the box's part
of the volume is resampled to ``crop_size`` and encoded on its own, as the 3D model's region look does, and
``rois_per_volume`` questions are drawn per volume and step; with ``roi: grid`` one encoder forward per volume
serves all its questions, pooled over the grid cells each box overlaps. ``train.pretrain.class_balance`` weighs
rare grades up in the cross-entropy.

Training runs through the project's trainer (``pretrain.py``: checkpoints, resume, multi-process). Besides the
encoder folder the run writes ``OUT/region_heads.safetensors`` and ``OUT/region_heads.json`` (the heads, their
grade lists and ROI mode), which the direct 3D classifier (``evaluation/classify.py``) loads. Volumes come from the
same preprocessing cache as the 3D family's training (boxes carried into each volume's frame,
``data.frame.VolumeFrame``: scaled to the model input, mirrored and re-centred with the volume); there is no
augmentation.
"""
from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError
from ..io_utils import atomic_path, write_json
from ..models.reasonknee3d.region_heads import (HEADS_FILE, HEADS_WEIGHTS, RegionGradeModel, grade_class_weights,
                                                grade_heads, head_key)
from ..schema import load_schema
from .pretrain_parts import PretrainParts


class RegionGradeDataset(Dataset):
    """One item per volume of a split: the cached model-input volume and its questions that have a box.

    Each question becomes its (category, field) head targets; grades are class indices into ``heads``. With
    ``rois_per_volume`` > 0 an item carries that many of the volume's questions, drawn anew on every read.
    """

    def __init__(self, data_dir: str | Path, split: str, prep: Any, heads: dict[str, list[int]],
                 rois_per_volume: int = 0) -> None:
        from ..data.cache import VolumeCache, preprocess_release
        from ..data.release import cache_root, iter_samples

        self.skipped: list[tuple[str, str]] = []
        samples = list(iter_samples(data_dir, split, images=prep.images))
        self.cache = VolumeCache(cache_root(data_dir, prep.cache_dir) / "volumes", prep)
        if not all(self.cache.has(s.image_path) for s in samples):
            preprocess_release(data_dir, prep, splits=[split], cache_dir=self.cache.dir)
        schema = load_schema()
        groups: dict[Path, list[Any]] = defaultdict(list)
        for s in samples:
            if s.box is None:
                self.skipped.append((s.sample_id, "no reference box"))
            elif not self.cache.has(s.image_path):
                self.skipped.append((s.sample_id, f"no preprocessed volume in {self.cache.dir}"))
            else:
                groups[s.image_path].append(s)
        self.volumes = sorted(groups)
        self.groups = [groups[p] for p in self.volumes]
        self.heads, self.schema, self.rois_per_volume = heads, schema, rois_per_volume
        if not self.groups:
            raise ValueError(f"{data_dir}: split {split!r} has no question with a reference box and a cached volume")

    def __len__(self) -> int:
        return len(self.groups)

    def targets(self) -> list[tuple[str, int]]:
        """Every (head key, class index) target of the split, for the class weights."""
        return [(head_key(self.schema[s.question_id].category, key), self.heads[head_key(
            self.schema[s.question_id].category, key)].index(grade))
            for group in self.groups for s in group for key, grade in s.severity.items()]

    def __getitem__(self, index: int) -> dict[str, Any]:
        group = self.groups[index]
        if 0 < self.rois_per_volume < len(group):
            # Python's RNG: seeded by transformers.set_seed, and per DataLoader worker by torch.
            group = random.sample(group, self.rois_per_volume)
        volume, meta = self.cache.read_tensor(self.volumes[index])  # (1, S, H, W) float16
        frame = self.cache.frame(group[0].image_path, meta, group[0].knee_side)  # mirror / recentre offset
        rois, targets = [], []
        for s in group:
            box = frame.box_to_model(s.box)
            spec = self.schema[s.question_id]
            for key, grade in s.severity.items():
                head = head_key(spec.category, key)
                targets.append((len(rois), head, self.heads[head].index(grade)))
            rois.append(box)
        return {"volume": volume, "rois": rois, "targets": targets}


def collate_region_grades(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> ``RegionGradeModel.forward`` keyword arguments (roi indices renumbered over the batch)."""
    rois, targets = [], []
    for row, item in enumerate(items):
        offset = len(rois)
        rois += [(row, box) for box in item["rois"]]
        targets += [(offset + roi, key, cls) for roi, key, cls in item["targets"]]
    return {"volumes": torch.stack([it["volume"] for it in items]).float(), "rois": rois, "targets": targets}


def save_region_heads(out: Path, model: nn.Module) -> None:
    """``region_heads.safetensors`` + ``region_heads.json`` of a trained ``RegionGradeModel``."""
    from safetensors.torch import save_file

    with atomic_path(out / HEADS_WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}, str(tmp))
    write_json(out / HEADS_FILE, {"grades": model.grades, **model.describe()})


def region_grades_parts(exp: Any, encoder: nn.Module) -> PretrainParts:
    """The region-grade model, dataset and collator of ``exp`` (see the module docstring)."""
    settings = exp.train.pretrain
    crop = None
    if settings.roi == "crop":
        crop = settings.crop_size or getattr(exp.model, "region_size", None)
        if crop is None:
            raise ConfigError("train.pretrain.roi: crop needs train.pretrain.crop_size or model.region_size "
                              "(the size each box is resampled to); or use roi: grid")
    heads = grade_heads()
    dataset = RegionGradeDataset(exp.train.data_dir, exp.train.split, exp.data, heads,
                                 settings.rois_per_volume if settings.roi == "crop" else 0)
    weights = grade_class_weights(dataset.targets(), heads, settings.class_balance)
    model = RegionGradeModel(encoder, heads, roi=settings.roi, crop_size=crop, class_weights=weights)
    return PretrainParts(model=model, dataset=dataset, collator=collate_region_grades,
                         save_extras=save_region_heads, skipped=dataset.skipped)
