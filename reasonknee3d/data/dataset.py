"""Torch ``Dataset`` of release samples over the preprocessed-volume cache (it never opens a NIfTI).

Each item is one (volume, question): the cached model-input volume, the prompt, the answer and the box in
model-input voxels (``frame.VolumeFrame.box_to_model``: ``boxes.scale_boxes`` from the loaded shape, mirrored
with the volume when the config's ``canonical_side`` mirrors this knee, moved with it by ``recentre``, then moved
by the training augmentation). The answer text always has the size of the ORIGINAL voxel grid (``orig_shape``),
like the references the scorer uses, in the volume's frame (``VolumeFrame.text_to_model``); when augmentation
moves the box, the answer's Location box is rewritten to the moved region mapped back to that grid. Samples of
one volume read the same memory-mapped cache file.

With ``augment_per_volume`` (``train.volume_grouping`` > 1) training items come un-augmented and the batch's
collator draws one augmentation per distinct volume (``VolumeAugment``), so questions about one volume in a batch
keep one identical input that the model encodes once.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ..boxes import box_to_text, scale_boxes
from ..constants import BOX_END, BOX_START
from .cache import VolumeCache
from .release import Sample
from .transforms import build_train_augment, build_volume_augment

_BOX_TEXT_RE = re.compile(re.escape(BOX_START) + r"\s*\[[^\]]*\]\s*" + re.escape(BOX_END))


def _reseed(transform: Any, last_seed: Optional[int]) -> int:
    """Reseed ``transform`` from torch's initial seed when that changed; returns the seed in use.

    DataLoader workers start with copies of one RandomState; torch gives every worker (and every epoch) its own
    initial seed, so reseeding from it keeps workers from repeating each other, and a seeded run repeats itself.
    """
    seed = torch.initial_seed() % 2**32
    if seed != last_seed:
        transform.set_random_state(seed=seed)
    return seed


def move_answer_box(answer: str, box: Sequence[int], input_shape: Sequence[int], orig_shape: Sequence[int]) -> str:
    """``answer`` with its (first) Location box replaced by ``box`` (model-input voxels) mapped to ``orig_shape``."""
    moved = scale_boxes(box, input_shape, orig_shape)
    return _BOX_TEXT_RE.sub(lambda _: box_to_text(moved), answer, count=1)


class VolumeQADataset(Dataset):
    """``samples`` read from ``cache``; ``train=True`` applies ``transforms.build_train_augment`` to each item, or
    with ``augment_per_volume`` leaves the augmentation to the collator (``volume_augment``, one draw per volume)."""

    def __init__(self, samples: Sequence[Sample], cache: VolumeCache, train: bool = False,
                 augment_per_volume: bool = False) -> None:
        self.samples = list(samples)
        self.cache = cache
        self.augment = build_train_augment(cache.cfg) if train and not augment_per_volume else None
        # What the collator applies to a batch of these items (None: items come augmented, or are never augmented).
        self.volume_augment = VolumeAugment(cache.cfg) if train and augment_per_volume else None
        self._aug_seed: Optional[int] = None

    def __len__(self) -> int:
        return len(self.samples)

    def _seed_augment(self) -> None:
        self._aug_seed = _reseed(self.augment, self._aug_seed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        volume, meta = self.cache.read_tensor(s.image_path)  # (1, S, H, W) float16
        orig_shape = tuple(int(v) for v in meta["orig_shape"])
        input_shape = tuple(volume.shape[1:])
        # The cache holds each volume in its model frame (PreprocessConfig.canonical_side mirrors knees of the
        # other side, recentre moves them onto their centroid): the box and the answer's Location box move with
        # it (predict moves generated boxes back).
        frame = self.cache.frame(s.image_path, meta, s.knee_side)
        box = None if s.box is None else frame.box_to_model(s.box)
        answer = frame.text_to_model(s.answer)
        if self.augment is not None:
            self._seed_augment()
            out = self.augment({"image": volume.float(), "box": box})
            volume = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float()
            if box is not None and out["box"] != box:
                box = out["box"]
                answer = move_answer_box(answer, box, input_shape, orig_shape)
        return {"volume": volume, "prompt": s.prompt, "answer": answer, "box": box,
                "question_id": s.question_id, "sample_id": s.sample_id, "orig_shape": orig_shape,
                "mirrored": frame.mirrored, "frame": frame, "image_path": str(s.image_path)}


class VolumeAugment:
    """The training augmentation drawn once per distinct volume of a batch (``train.volume_grouping`` > 1).

    ``__call__(items)`` takes un-augmented ``VolumeQADataset`` items, groups them by ``image_path`` (the volume they
    ask about, not tensor equality), draws one augmentation per group (``transforms.build_volume_augment``): the
    volume is transformed once and every row's box moves with that same zoom, its answer's Location box rewritten
    as ``VolumeQADataset`` does per item. Returns the new items (rows of one volume share one volume tensor) and
    each row's group index in order of first appearance. Seeded like the per-item augmentation (``_reseed``).
    """

    def __init__(self, cfg: Any) -> None:
        self.transform = build_volume_augment(cfg)
        self._seed: Optional[int] = None

    def __call__(self, items: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
        self._seed = _reseed(self.transform, self._seed)
        groups: dict[str, list[int]] = {}
        for row, it in enumerate(items):
            groups.setdefault(str(it["image_path"]), []).append(row)
        out = [dict(it) for it in items]
        index = [0] * len(items)
        for k, rows in enumerate(groups.values()):
            first = items[rows[0]]
            input_shape = tuple(first["volume"].shape[1:])
            d = self.transform({"image": first["volume"].float(), "boxes": [items[r]["box"] for r in rows]})
            volume = torch.as_tensor(d["image"]).as_subclass(torch.Tensor).float()
            for r, box in zip(rows, d["boxes"]):
                index[r] = k
                out[r]["volume"] = volume
                if items[r]["box"] is not None and box != items[r]["box"]:
                    out[r]["box"] = box
                    out[r]["answer"] = move_answer_box(items[r]["answer"], box, input_shape, items[r]["orig_shape"])
        return out, index
