"""``train.stage: segmentation``: pretrain the 3D model's volume encoder to label every voxel with the release's mask.

Every volume of ``train.split`` with a usable mask is one training item: its cached model-input volume
(``data/cache.py``) and its mask at the same size, mirrored the same way (``data/mask_cache.py``). The model is
the encoder plus a per-cell linear decoder (``models/reasonknee3d/segmentation_head.py``) trained with MONAI's
``DiceCELoss``; the training log gains ``dice``, the mean foreground Dice of the argmax labels.

Volumes without a usable mask (no ``label_filepath``, a refused path, a missing or unreadable file, a mask of
another shape than its volume) and volumes whose image could not be preprocessed are left out and listed in
``OUT/skipped.jsonl``; a split with none left is an error. ``train.pretrain.num_labels`` unset takes the largest
label in the split's stored masks + 1; a mask holding a label >= ``num_labels`` is an error naming the file.

Training runs through the project's trainer (``pretrain.py``: checkpoints, resume, multi-process). Besides the
encoder folder the run writes ``OUT/segmentation_head.safetensors`` and ``OUT/segmentation_head.json``, which
``load_segmentation_model`` reads back with the encoder. There is no augmentation.
"""
from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError
from ..io_utils import atomic_path, write_json
from ..models.reasonknee3d.segmentation_head import HEAD_FILE, HEAD_WEIGHTS, SegmentationModel
from .pretrain_parts import PretrainParts

logger = logging.getLogger(__name__)


class SegmentationDataset(Dataset):
    """One item per volume of a split that has a usable mask: ``{"volume": (1, S, H, W) float16, "mask":
    (1, S, H, W) uint8}`` at the model input size. Missing volume and mask cache entries are written here (the
    runner builds the dataset on the main process first). ``skipped``: (volume id, reason) left out."""

    def __init__(self, data_dir: str | Path, split: str, prep: Any) -> None:
        from ..data import release_forms as rf
        from ..data.cache import CacheMiss, VolumeCache, preprocess_release
        from ..data.io import VolumeError
        from ..data.mask_cache import MaskCache
        from ..data.release import ReleaseError, ReleaseLoader, cache_root

        self.skipped: list[tuple[str, str]] = []
        records, problems = ReleaseLoader(data_dir, images=prep.images).volume_rows(split)
        self.skipped += [(p.volume_id or f"{p.csv.name} line {p.line}", p.reason) for p in problems]
        root = cache_root(data_dir, prep.cache_dir)
        self.volume_cache = VolumeCache(root / "volumes", prep)
        self.mask_cache = MaskCache(root / "masks", prep)

        def cached(path: Path) -> bool:
            try:
                return self.volume_cache.has(path)
            except CacheMiss:
                return False

        if not all(cached(r.image_path) for r in records):
            preprocess_release(data_dir, prep, splits=[split], cache_dir=self.volume_cache.dir)
        self.items: list[tuple[Path, Path]] = []
        self.metas: list[dict[str, Any]] = []
        no_mask = 0
        for rec in records:
            reason: Optional[str] = None
            if rec.mask_problem is not None:
                reason = f"mask path refused: {rec.mask_problem}"
            elif rec.mask_path is None:
                reason = "no mask: the split CSV row has no label_filepath"
            elif rec.mask_form == rf.FORM_PATH_MISSING or not rec.mask_path.is_file():
                reason = f"no mask: {rec.mask_path}: file not found"
            if reason is not None:
                no_mask += 1
                self.skipped.append((rec.volume_id, reason))
                continue
            if not cached(rec.image_path):
                self.skipped.append((rec.volume_id, f"no preprocessed volume in {self.volume_cache.dir} (see "
                                                    f"preprocess_skipped.jsonl there)"))
                continue
            try:
                # With data.recentre the mask moves by its volume's offset, read from the volume's cache entry.
                offset = (self.volume_cache.load(rec.image_path)[1].get("offset") if prep.recentre is not None
                          else None)
                meta = self.mask_cache.ensure(rec.image_path, rec.mask_path, offset)  # type: ignore[arg-type]
            except (VolumeError, ReleaseError, CacheMiss) as e:
                no_mask += 1
                self.skipped.append((rec.volume_id, f"unusable mask: {e}"))
                continue
            self.items.append((rec.image_path, rec.mask_path))  # type: ignore[arg-type]
            self.metas.append(meta)
        if not self.items:
            raise ValueError(f"{data_dir}: split {split!r} has no volume with a usable mask: {no_mask} of "
                             f"{len(records)} volumes have no mask or an unusable one, "
                             f"{len(self.skipped) - no_mask} other rows were left out (first: "
                             f"{self.skipped[0][0] + ': ' + self.skipped[0][1] if self.skipped else 'none'})")
        if self.skipped:
            logger.info("segmentation: %d of %d volumes of split %s have a usable mask; %d left out (%d without a "
                        "usable mask)", len(self.items), len(records), split, len(self.skipped), no_mask)

    def __len__(self) -> int:
        return len(self.items)

    def max_label(self) -> int:
        """The largest label in the stored masks of the items (before resizing)."""
        return max(int(m["max_label"]) for m in self.metas)

    def labels_seen(self) -> list[int]:
        """The labels left in the items' masks at the model input size (background 0 included)."""
        return sorted({int(v) for m in self.metas for v in m["labels"]})

    def check_labels(self, num_labels: int) -> None:
        """ValueError naming the first mask file with a label >= ``num_labels``."""
        for meta in self.metas:
            if int(meta["max_label"]) >= num_labels:
                raise ValueError(f"{meta['mask']}: mask label {meta['max_label']} >= num_labels {num_labels} "
                                 f"(train.pretrain.num_labels; labels must be 0..{num_labels - 1})")

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_path, mask_path = self.items[index]
        volume, _ = self.volume_cache.read_tensor(image_path)  # (1, S, H, W) float16
        mask, _ = self.mask_cache.read_tensor(image_path, mask_path)  # (1, S, H, W) uint8
        return {"volume": volume, "mask": mask}


def collate_segmentation(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items -> ``SegmentationModel.forward`` keyword arguments: ``volumes`` float32 and ``masks`` uint8, both
    ``(B, 1, S, H, W)``."""
    return {"volumes": torch.stack([it["volume"] for it in items]).float(),
            "masks": torch.stack([it["mask"] for it in items])}


def save_segmentation_head(out: Path, model: nn.Module, labels_seen: Sequence[int] = ()) -> None:
    """``segmentation_head.safetensors`` + ``segmentation_head.json`` of a trained ``SegmentationModel``."""
    from safetensors.torch import save_file

    with atomic_path(out / HEAD_WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}, str(tmp))
    write_json(out / HEAD_FILE, {**model.describe(), "labels_seen": [int(v) for v in labels_seen],
                                 "label_count_seen": len(labels_seen)})


def segmentation_parts(exp: Any, encoder: nn.Module) -> PretrainParts:
    """The segmentation model, dataset and collator of ``exp`` (see the module docstring)."""
    settings = exp.train.pretrain
    dataset = SegmentationDataset(exp.train.data_dir, exp.train.split, exp.data)
    num_labels = settings.num_labels
    if num_labels is None:
        num_labels = dataset.max_label() + 1
        if num_labels < 2:
            raise ValueError(f"{exp.train.data_dir}: the masks of split {exp.train.split!r} hold no label but "
                             f"background 0; nothing to segment")
    dataset.check_labels(num_labels)
    try:
        model = SegmentationModel(encoder, num_labels, settings.dice_weight)
    except ValueError as err:
        raise ConfigError(f"train.stage: segmentation: {err}") from None
    return PretrainParts(model=model, dataset=dataset, collator=collate_segmentation,
                         save_extras=partial(save_segmentation_head, labels_seen=dataset.labels_seen()),
                         skipped=dataset.skipped)
