"""``train.stage: region_grades``: pretrain the 3D model's volume encoder to grade what lies in each reference box.

One encoder forward per volume; for each of the volume's questions with a box, the encoder features whose grid
cells overlap the reference box are mean-pooled (the ROI feature), and one linear head per (question category,
grade field) predicts that field's MOAKS grade from it (cross-entropy, averaged over every target in the batch).
No projector or language model is built. The run writes

- ``OUT/encoder/``: the encoder alone (``config.json`` + ``model.safetensors``), which an experiment loads with
  ``model.encoder.init_from: OUT/encoder`` (``encoders.base.load_encoder_folder``) when it builds a fresh model;
- ``OUT/region_heads.safetensors`` + ``OUT/region_heads.json``: the heads and their grade lists (for probing);
- ``OUT/metrics.jsonl``: loss and accuracy every ``train.logging_steps`` steps; ``OUT/config.yaml``.

Volumes come from the same preprocessing cache as the 3D family's training (boxes scaled to the model input
and mirrored with the volume under ``data.canonical_side``); there is no augmentation, checkpointing or resume,
and it runs in one process.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from ..boxes import mirror_boxes, scale_boxes
from ..config import ConfigError
from ..io_utils import atomic_dir, atomic_path, write_json, write_jsonl
# The model and its pooling live with the 3D model (the direct classifier in evaluation/ uses them too).
from ..models.reasonknee3d.region_heads import (HEADS_FILE, HEADS_WEIGHTS, RegionGradeModel, box_cells,  # noqa: F401
                                                grade_heads, head_key, roi_pool)
from ..schema import load_schema

logger = logging.getLogger(__name__)


class RegionGradeDataset(Dataset):
    """One item per volume of a split: the cached model-input volume and every question of it that has a box.

    Each question becomes its (category, field) head targets; grades are class indices into ``heads``.
    """

    def __init__(self, data_dir: str | Path, split: str, prep: Any, heads: dict[str, list[int]]) -> None:
        from ..data.cache import VolumeCache, preprocess_release
        from ..data.release import ReleaseLoader, iter_samples

        self.skipped: list[tuple[str, str]] = []
        samples = list(iter_samples(data_dir, split))
        self.cache = VolumeCache(ReleaseLoader(data_dir).root / "cache" / "volumes", prep)
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
        self.heads, self.schema = heads, schema
        if not self.groups:
            raise ValueError(f"{data_dir}: split {split!r} has no question with a reference box and a cached volume")

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> dict[str, Any]:
        group = self.groups[index]
        volume, meta = self.cache.read_tensor(self.volumes[index])  # (1, S, H, W) float16
        orig_shape = tuple(int(v) for v in meta["orig_shape"])
        input_shape = tuple(volume.shape[1:])
        mirrored = self.cache.cfg.mirrors(group[0].image_path, group[0].knee_side)
        rois, targets = [], []
        for s in group:
            box = [int(v) for v in scale_boxes(s.box, orig_shape, input_shape)]
            if mirrored:
                box = [int(v) for v in mirror_boxes(box, input_shape)]
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


@dataclass
class RegionGradeResult:
    output_dir: Path
    final_dir: Path
    """The encoder folder (``model.encoder.init_from``)."""
    global_step: int
    metrics: dict[str, float]
    model: RegionGradeModel
    skipped: list[tuple[str, str]]
    merged_dir: Optional[Path] = None
    resumed_from: Optional[str] = None


def run_region_grades(exp: Any) -> RegionGradeResult:
    """Pretrain the encoder of ``exp`` (family ``3d``, ``train.stage: region_grades``); see the module docstring."""
    from transformers import get_scheduler, set_seed

    from ..families import save_experiment_config
    from ..models.reasonknee3d.encoders import build_encoder, init_encoder_from_files

    train = exp.train
    if not hasattr(exp.model, "sub_configs"):
        raise ConfigError(f"train.stage: region_grades pretrains the 3D model's volume encoder; family "
                          f"{exp.family!r} has none")
    if train.data_dir is None:
        raise ConfigError("train.data_dir: no release folder given (use --data DIR or train.data_dir=DIR)")
    out = exp.output_dir()
    exp = replace(exp, train=replace(train, output_dir=str(out)))
    set_seed(train.seed)
    enc_config, _ = exp.model.sub_configs(exp.data.input_shape)
    encoder = build_encoder(enc_config)
    init_encoder_from_files(encoder)
    heads = grade_heads()
    model = RegionGradeModel(encoder, heads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()

    dataset = RegionGradeDataset(train.data_dir, train.split, exp.data, heads)
    if dataset.skipped:
        logger.info("region_grades: %d questions left out: %s", len(dataset.skipped),
                    "; ".join(f"{sid} ({why})" for sid, why in dataset.skipped[:5])
                    + (" ..." if len(dataset.skipped) > 5 else ""))
    loader = DataLoader(dataset, batch_size=train.per_device_batch_size, shuffle=True,
                        collate_fn=collate_region_grades, num_workers=train.dataloader_num_workers,
                        generator=torch.Generator().manual_seed(train.seed))
    steps = train.max_steps if train.max_steps > 0 else max(1, math.ceil(train.num_epochs * len(loader)
                                                                          / train.gradient_accumulation_steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    scheduler = get_scheduler(train.lr_scheduler, optimizer, num_warmup_steps=int(train.warmup_ratio * steps),
                              num_training_steps=steps)
    out.mkdir(parents=True, exist_ok=True)
    save_experiment_config(exp, out / "config.yaml")

    logs: list[dict[str, Any]] = []
    step, window = 0, {"loss": 0.0, "correct": 0, "n": 0, "micro": 0}
    t0 = time.perf_counter()
    batches = iter(())
    while step < steps:
        for _ in range(train.gradient_accumulation_steps):
            batch = next(batches, None)
            if batch is None:
                batches = iter(loader)
                batch = next(batches)
            result = model(batch["volumes"].to(device), batch["rois"], batch["targets"])
            (result["loss"] / train.gradient_accumulation_steps).backward()
            window["loss"] += float(result["loss"].detach())
            window["correct"] += result["correct"]
            window["n"] += result["n"]
            window["micro"] += 1
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % train.logging_steps == 0 or step == steps:
            logs.append({"step": step, "loss": window["loss"] / window["micro"],
                         "accuracy": window["correct"] / max(1, window["n"]), "targets": window["n"],
                         "learning_rate": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0})
            logger.info("region_grades step %d/%d: loss %.4f, accuracy %.3f", step, steps, logs[-1]["loss"],
                        logs[-1]["accuracy"])
            window = {"loss": 0.0, "correct": 0, "n": 0, "micro": 0}

    model.eval()
    final_dir = out / "encoder"
    with atomic_dir(final_dir) as tmp:
        encoder.save_pretrained(tmp)
    from safetensors.torch import save_file
    with atomic_path(out / HEADS_WEIGHTS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}, str(tmp))
    write_json(out / HEADS_FILE, {"grades": heads, "hidden_size": encoder.config.hidden_size})
    write_jsonl(out / "metrics.jsonl", logs)
    if dataset.skipped:
        write_jsonl(out / "skipped.jsonl", [{"item": sid, "reason": why} for sid, why in dataset.skipped])
    return RegionGradeResult(output_dir=out, final_dir=final_dir, global_step=step, metrics=logs[-1], model=model,
                             skipped=dataset.skipped)
