"""Torch ``Dataset`` of release samples over the preprocessed-volume cache (it never opens a NIfTI).

Each item is one (volume, question): the cached model-input volume, the prompt, the answer and the box in
model-input voxels (``boxes.scale_boxes`` from the loaded shape, mirrored with the volume when the config's
``canonical_side`` mirrors this knee, then moved by the training augmentation).
The answer text always refers to the ORIGINAL voxel grid (``orig_shape``), like the references the scorer
uses; when augmentation moves the box, the answer's Location box is rewritten to the moved region mapped
back to that grid. Samples of one volume read the same memory-mapped cache file.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Dataset

from ..boxes import box_to_text, mirror_boxes, mirror_text_boxes, scale_boxes
from ..constants import BOX_END, BOX_START
from .cache import VolumeCache
from .release import Sample
from .transforms import build_train_augment

_BOX_TEXT_RE = re.compile(re.escape(BOX_START) + r"\s*\[[^\]]*\]\s*" + re.escape(BOX_END))


class VolumeQADataset(Dataset):
    """``samples`` read from ``cache``; ``train=True`` applies ``transforms.build_train_augment``."""

    def __init__(self, samples: Sequence[Sample], cache: VolumeCache, train: bool = False) -> None:
        self.samples = list(samples)
        self.cache = cache
        self.augment = build_train_augment(cache.cfg) if train else None
        self._aug_seed: Optional[int] = None

    def __len__(self) -> int:
        return len(self.samples)

    def _seed_augment(self) -> None:
        # DataLoader workers start with copies of one RandomState; torch gives every worker (and every
        # epoch) its own initial seed, so reseeding from it keeps workers from repeating each other.
        seed = torch.initial_seed() % 2**32
        if seed != self._aug_seed:
            self.augment.set_random_state(seed=seed)
            self._aug_seed = seed

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        volume, meta = self.cache.read_tensor(s.image_path)  # (1, S, H, W) float16
        orig_shape = tuple(int(v) for v in meta["orig_shape"])
        input_shape = tuple(volume.shape[1:])
        box = None if s.box is None else [int(v) for v in scale_boxes(s.box, orig_shape, input_shape)]
        answer = s.answer
        # The cache holds knees of the non-canonical side mirrored (PreprocessConfig.canonical_side): mirror
        # the box and the answer's Location box with them (predict mirrors generated boxes back).
        mirrored = self.cache.cfg.mirrors(s.image_path, s.knee_side)
        if mirrored:
            box = None if box is None else [int(v) for v in mirror_boxes(box, input_shape)]
            answer = mirror_text_boxes(answer, orig_shape)
        if self.augment is not None:
            self._seed_augment()
            out = self.augment({"image": volume.float(), "box": box})
            volume = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float()
            if box is not None and out["box"] != box:
                box = out["box"]
                moved = scale_boxes(box, input_shape, orig_shape)
                answer = _BOX_TEXT_RE.sub(lambda _: box_to_text(moved), answer, count=1)
        return {"volume": volume, "prompt": s.prompt, "answer": answer, "box": box,
                "question_id": s.question_id, "sample_id": s.sample_id, "orig_shape": orig_shape,
                "mirrored": mirrored}
