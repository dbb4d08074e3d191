"""One trainer for both model families: ``run_training`` builds a transformers Trainer from an ExperimentConfig.

config -> family parts -> trainable setup (``stages``) -> ``hf_trainer.ReasonKneeTrainer`` -> final / merged
model. The encoder pretraining stages (``train.stage: region_grades | segmentation``) go to ``pretrain``.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Sequence

from transformers import TrainerCallback, set_seed

from ..attention import select_attn_implementation
from ..config import ENCODER_STAGES
from ..families import ExperimentConfig, get_family
from .checkpoints import BASE_MODEL_DIR, atomic_dir, merge_checkpoint, resolve_resume
# Re-exported: the names callers have imported from here.
from .hf_trainer import (EXPERIMENT_FILE, NonFiniteTrainingError, ReasonKneeTrainer, TrainResult,  # noqa: F401
                         build_trainer, build_training_arguments, save_final, use_bf16)
from .losses import CoordinateSmoothedLoss
from .sampling import grade_balance_weights
from .stages import describe_trainable, setup_trainable, unwrap_base

logger = logging.getLogger(__name__)


def run_training(exp: ExperimentConfig, family: Any = None,
                 callbacks: Sequence[TrainerCallback] = ()) -> TrainResult:
    """Train ``exp`` end to end; resumes from the last checkpoint when ``train.resume`` is auto.

    ``family`` overrides the family named by ``exp.family`` (tests pass a toy one); ``callbacks`` are added
    to the Trainer's own.
    """
    if exp.train.stage in ENCODER_STAGES:
        # Encoder pretraining: the encoder and a small head, no projector or language model (pretrain.py).
        from .pretrain import run_encoder_pretraining
        return run_encoder_pretraining(exp, callbacks)
    family = family if family is not None else get_family(exp.family)
    out = exp.output_dir()
    exp = replace(exp, train=replace(exp.train, output_dir=str(out)))
    resume = resolve_resume(exp.train.resume, out)
    args = build_training_arguments(exp.train, out)  # also sets up the process group under torchrun
    set_seed(exp.train.seed)

    attn = select_attn_implementation(exp.train.attn_implementation)
    base_dir = out / BASE_MODEL_DIR
    uses_lora = exp.train.language_model == "lora"
    if uses_lora and resume is not None and (base_dir / "config.json").is_file():
        # The checkpoints link to these base weights: resume on exactly them.
        model, processor = family.load(base_dir, attn)
    else:
        model, processor = family.build(exp, attn)
        if uses_lora and args.process_index == 0:
            # A fresh start replaces the base of any earlier run in this folder.
            with atomic_dir(base_dir) as tmp:
                model.save_pretrained(tmp)
    new_ids = family.new_token_ids(model, processor)
    model = setup_trainable(model, exp.train, family.module_paths(model), new_ids)
    logger.info(describe_trainable(model))

    # One process fills missing cache entries while the others wait, then all read the cache.
    with args.main_process_first(desc="preprocessing cache"):
        dataset, collator = family.train_data(exp, model, processor)
    lengths = family.train_lengths(dataset) if exp.train.group_by_length else None
    weights = None
    if exp.train.grade_balance > 0:
        samples = getattr(dataset, "samples", None)
        if samples is None:
            raise ValueError(f"train.grade_balance needs a dataset with .samples (data-layer Samples); the "
                             f"{exp.family!r} family's {type(dataset).__name__} has none")
        weights = grade_balance_weights(samples, exp.train.grade_balance)
    loss_func = None
    if exp.train.coord_label_sigma > 0:
        loss_func = CoordinateSmoothedLoss(family.coord_token_ids(unwrap_base(model), processor),
                                           exp.train.coord_label_sigma)
    trainer = build_trainer(
        exp, args, callbacks, model=model, train_dataset=dataset, data_collator=collator,
        processing_class=processor, train_lengths=lengths, train_weights=weights, compute_loss_func=loss_func,
        base_model_dir=base_dir if uses_lora else None)
    output = trainer.train(resume_from_checkpoint=resume)
    final_dir = save_final(trainer)
    merged_dir = None
    if exp.train.merge and args.should_save:
        merged_dir = merge_checkpoint(final_dir, out / "merged", family.model_class)
    # Only the main process writes final/ and merged/: the others wait for it, so that the folder they return
    # exists and no rank leaves (and tears down its process group) while another still works.
    trainer.accelerator.wait_for_everyone()
    return TrainResult(output_dir=out, final_dir=final_dir, merged_dir=merged_dir,
                       global_step=trainer.state.global_step, resumed_from=resume, metrics=dict(output.metrics),
                       model=trainer.model)

