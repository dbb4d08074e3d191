"""Encoder pretraining stages (``train.stage: region_grades | segmentation``) through the project's one trainer.

Each stage supplies ``PretrainParts``: a model made of the 3D model's volume encoder plus a small head whose
``forward(**batch)`` returns ``{"loss": ...}``, the training dataset (one item per volume, read from the volume
cache) and its collator, and what it writes next to the encoder. ``ReasonKneeTrainer`` then gives these stages
what every run has: the schedule, gradient accumulation, bf16 autocast, metrics.jsonl and tensorboard,
checkpoints (the whole model's ``model.safetensors``), resume from the newest complete checkpoint, the stop at a
non-finite loss, and multi-process training under torchrun / accelerate.

A run writes, besides ``checkpoint-N/``, ``final/`` (the whole model), ``config.yaml`` and ``metrics.jsonl``:

- ``OUT/encoder/``: the encoder alone (``config.json`` + ``model.safetensors``), which an experiment loads with
  ``model.encoder.init_from: OUT/encoder`` when it builds a fresh 3D model;
- the stage's own files (``region_grades``: the grade heads; ``segmentation``: the decoder head);
- ``OUT/skipped.jsonl``: what the stage left out and why (questions without a box, volumes without a mask).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable, Sequence

from torch import nn

from ..config import ConfigError
from ..io_utils import atomic_dir, normalize_permissions, write_jsonl
from .hf_trainer import TrainResult, build_trainer, build_training_arguments, save_final
from .pretrain_parts import PretrainParts

logger = logging.getLogger(__name__)

ENCODER_DIR = "encoder"


def _stage_parts(stage: str) -> Callable[[Any, nn.Module], PretrainParts]:
    if stage == "region_grades":
        from .region_grades import region_grades_parts
        return region_grades_parts
    if stage == "segmentation":
        from .segmentation import segmentation_parts
        return segmentation_parts
    raise ConfigError(f"train.stage: {stage!r} is not an encoder pretraining stage")


def run_encoder_pretraining(exp: Any, callbacks: Sequence[Any] = ()) -> Any:
    """Train the encoder of ``exp`` (family ``3d``) with the stage's head; see the module docstring.

    Returns ``trainer.TrainResult`` (``final_dir`` is the encoder folder, ``model`` the trained stage model).
    """
    from transformers import set_seed

    from ..models.reasonknee3d.encoders import build_encoder, init_encoder_from_files
    from .checkpoints import resolve_resume

    train = exp.train
    if not hasattr(exp.model, "sub_configs"):
        raise ConfigError(f"train.stage: {train.stage} pretrains the 3D model's volume encoder; family "
                          f"{exp.family!r} has none")
    if train.data_dir is None:
        raise ConfigError("train.data_dir: no release folder given (use --data DIR or train.data_dir=DIR)")
    if train.grade_balance > 0 or train.volume_grouping > 1 or train.group_by_length:
        raise ConfigError(f"train.stage: {train.stage} draws whole volumes; train.grade_balance, "
                          "train.volume_grouping and train.group_by_length do not apply (region_grades weighs rare "
                          "grades with train.pretrain.class_balance)")
    out = exp.output_dir()
    exp = replace(exp, train=replace(train, output_dir=str(out)))
    resume = resolve_resume(train.resume, out)
    args = build_training_arguments(exp.train, out)  # also sets up the process group under torchrun
    set_seed(train.seed)
    enc_config, _ = exp.model.sub_configs(exp.data.input_shape)
    encoder = build_encoder(enc_config)
    init_encoder_from_files(encoder)
    # One process fills missing cache entries while the others wait, then all read the cache.
    with args.main_process_first(desc="preprocessing cache"):
        parts = _stage_parts(train.stage)(exp, encoder)
    if parts.skipped:
        logger.info("%s: %d items left out: %s", train.stage, len(parts.skipped),
                    "; ".join(f"{item} ({why})" for item, why in parts.skipped[:5])
                    + (" ..." if len(parts.skipped) > 5 else ""))

    trainer = build_trainer(exp, args, callbacks, model=parts.model, train_dataset=parts.dataset,
                            data_collator=parts.collator)
    output = trainer.train(resume_from_checkpoint=resume)
    save_final(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.eval()
    if args.should_save:
        with atomic_dir(out / ENCODER_DIR) as tmp:
            model.encoder.save_pretrained(tmp)
        parts.save_extras(out, model)
        if parts.skipped:
            write_jsonl(out / "skipped.jsonl", [{"item": item, "reason": why} for item, why in parts.skipped])
        normalize_permissions(out)
    trainer.accelerator.wait_for_everyone()  # every rank returns once the folders are written (see run_training)
    return TrainResult(output_dir=out, final_dir=out / ENCODER_DIR, merged_dir=None,
                       global_step=trainer.state.global_step, resumed_from=resume, metrics=dict(output.metrics),
                       model=model)
