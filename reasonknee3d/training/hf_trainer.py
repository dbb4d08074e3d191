"""The project's ``transformers.Trainer``: ``ReasonKneeTrainer`` and the mapping of ``TrainConfig`` onto
``TrainingArguments``, shared by ``trainer.run_training`` (the model families) and ``pretrain`` (the encoder
pretraining stages).

Trainer provides the schedule, gradient accumulation, mixed precision, activation checkpointing, logging
integrations, checkpoint rotation, resume and DDP/FSDP/DeepSpeed (through accelerate). ``ReasonKneeTrainer`` adds
only what the project needs on top:

- throughput and data-wait numbers in every log record (``get_batch_samples`` is where Trainer pulls
  batches from the loader, so timing it measures exactly how long the model waited for data), and the model's own
  training metrics where it counts them (``log_metrics()``);
- length-grouped batches from lengths the family computes cheaply (no volume is loaded for it), grade-balanced
  or volume-grouped sampling (``sampling``);
- checkpoints that ``from_pretrained`` loads (see ``checkpoints``), each with the resolved experiment;
- a stop with ``NonFiniteTrainingError`` at the first optimizer step whose loss or gradient norm is not
  finite, before the optimizer applies it, and a refusal to save non-finite weights (checkpoint or final).
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..config import TrainConfig
from ..families import ExperimentConfig, save_experiment_config
from ..io_utils import normalize_permissions
from ..models.precision import describe_saved_precision
from .callbacks import MetricsJsonlCallback, ProgressBarCallback, ThroughputMeter
from .checkpoints import link_base_files
from .losses import answer_logits_only, takes_logits_to_keep
from .sampling import GradeBalancedSampler, VolumeGroupedSampler

EXPERIMENT_FILE = "experiment.yaml"


class NonFiniteTrainingError(RuntimeError):
    """The loss, the gradient norm or the weights became NaN / infinite; training stops without saving them."""


def use_bf16(setting: Any) -> bool:
    """``train.bf16`` -> whether to autocast in bf16: ``auto`` means on a CUDA device that supports it."""
    if setting == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(setting)


def build_training_arguments(train: TrainConfig, output_dir: str | Path) -> TrainingArguments:
    """TrainingArguments for ``train`` (one place that maps our schema onto transformers')."""
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.per_device_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_steps=train.max_steps,
        num_train_epochs=train.num_epochs,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps in transformers 5
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        bf16=use_bf16(train.bf16),
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=train.activation_checkpointing,
        # Non-reentrant checkpointing works with frozen embeddings (no enable_input_require_grads hack).
        activation_checkpointing_kwargs={"use_reentrant": False} if train.activation_checkpointing else None,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        report_to=list(train.report_to),
        dataloader_num_workers=train.dataloader_num_workers,
        dataloader_persistent_workers=train.dataloader_num_workers > 0,
        # Items carry prompt/answer text and metadata the family collator turns into model inputs.
        remove_unused_columns=False,
        # Under torchrun without CUDA, DDP runs over gloo; single processes need no backend at all.
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
        # Frozen modules get no gradient; DDP must not wait for them.
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
        # Trainer would otherwise log a NaN / inf loss as the running average; ReasonKneeTrainer stops instead.
        logging_nan_inf_filter=False,
    )


class ReasonKneeTrainer(Trainer):
    """transformers.Trainer with data-wait timing, precomputed length grouping and loadable checkpoints."""

    def __init__(self, *args: Any, experiment: ExperimentConfig, train_lengths: Optional[Sequence[int]] = None,
                 train_weights: Optional[torch.Tensor] = None, base_model_dir: Optional[Path] = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.experiment = experiment
        self.train_lengths = list(train_lengths) if train_lengths is not None else None
        self.train_weights = train_weights
        self.base_model_dir = base_model_dir
        self.meter = ThroughputMeter(world_size=max(1, self.args.world_size))
        self._cut_logits: Optional[bool] = None
        self._step_losses: list[torch.Tensor] = []

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        group = self.experiment.train.volume_grouping
        samples = getattr(self.train_dataset, "samples", None)
        if group > 1 and samples is not None:
            return VolumeGroupedSampler([s.volume_id for s in samples], group, seed=self.args.seed)
        if self.train_weights is not None:
            return GradeBalancedSampler(self.train_weights, seed=self.args.seed)
        if self.train_lengths is not None:
            # Trainer's own group_by_length would load every item to measure it; the family knows lengths.
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=self.train_lengths)
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Optional[Any] = None) -> Any:
        # Logits only over the answer columns (losses.answer_logits_only): same loss, far less memory.
        if self._cut_logits is None:
            self._cut_logits = takes_logits_to_keep(self.accelerator.unwrap_model(model))
        if self._cut_logits:
            inputs = answer_logits_only(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model: Any, inputs: dict[str, Any],
                      num_items_in_batch: Optional[Any] = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_losses.append(loss.detach().float().reshape(-1))  # checked once per optimizer step
        return loss

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        # Trainer calls this once per optimizer step, after the last micro-batch's backward and before
        # optimizer.step(): the place to stop before a non-finite update reaches the weights.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        losses = torch.cat(self._step_losses) if self._step_losses else torch.zeros(1, device=self.args.device)
        self._step_losses = []
        norm = float(grad_norm) if grad_norm is not None else 0.0
        # The loss is this process's own: every process must take the same decision, or the others would
        # wait for it forever in the next collective. The gradient norm is already the same everywhere.
        if _any_process(not bool(torch.isfinite(losses).all()), self.args) or not math.isfinite(norm):
            shown = [round(v, 4) for v in losses.cpu().tolist()[:8]]
            raise NonFiniteTrainingError(
                f"training stopped at step {self.state.global_step + 1}: loss {shown} / gradient norm {norm} is "
                f"not finite; the step was not applied and nothing of it was saved. Lower train.learning_rate "
                f"(now {self.args.learning_rate}) or look for NaN / inf in the inputs; the last checkpoint in "
                f"{self.args.output_dir} (if any) is from before this step")
        return grad_norm

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple[list, Any]:
        start = time.perf_counter()
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        wait = time.perf_counter() - start
        self.meter.record(wait, sum(_batch_size(b) for b in batches))
        return batches, num_items

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs:
            logs.update(self.meter.interval())
            # Models that count their own training metrics (the encoder pretraining stages) report them here.
            own = getattr(self.accelerator.unwrap_model(self.model), "log_metrics", None)
            if callable(own):
                logs.update(own())
        super().log(logs, start_time)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self.meter.interval()  # start the first window at the start of training, not at construction
        return super().train(*args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        # Checkpoints and the final model both come through here (on every process).
        bad = [n for n, p in self.model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if _any_process(bool(bad), self.args):
            names = ", ".join(bad[:3]) if bad else "on another process"
            raise NonFiniteTrainingError(
                f"step {self.state.global_step}: trainable weights are not finite ({names}); not saving them to "
                f"{output_dir or self.args.output_dir}. Lower train.learning_rate (now {self.args.learning_rate})")
        if not isinstance(self.model, PeftModel):
            # A fully trained, float32 language model under a bfloat16 dtype: the saved config says so, and the
            # folder loads back in float32 (with LoRA, the adapter file keeps what trained in float32).
            describe_saved_precision(self.model)
        super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        out = Path(output_dir or self.args.output_dir)
        save_experiment_config(self.experiment, out / EXPERIMENT_FILE)
        if isinstance(self.model, PeftModel) and self.base_model_dir is not None:
            link_base_files(self.base_model_dir, out)
        normalize_permissions(out)  # weight shards arrive as private 0600 temporary files

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        model = model if model is not None else self.model
        if isinstance(model, PeftModel):
            # Our LoRA checkpoints also hold the base weights (for from_pretrained); Trainer would load
            # those into the peft wrapper and skip the adapter, so load the adapter, which holds
            # everything that trains.
            model.load_adapter(resume_from_checkpoint, model.active_adapter, is_trainable=True)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)


def _any_process(flag: bool, args: TrainingArguments) -> bool:
    """``flag`` or-ed over all processes (one scalar all-reduce when distributed)."""
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([float(flag)], device=args.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())
    return flag


def _batch_size(batch: Any) -> int:
    """Number of samples in a collated batch (first tensor's leading dimension)."""
    if isinstance(batch, dict):
        for key in ("input_ids", "labels"):
            if torch.is_tensor(batch.get(key)):
                return int(batch[key].shape[0])
        for value in batch.values():
            if torch.is_tensor(value):
                return int(value.shape[0])
    return 0


@dataclass
class TrainResult:
    """Where a run wrote its outputs and how far it got."""

    output_dir: Path
    final_dir: Path
    merged_dir: Optional[Path]
    global_step: int
    resumed_from: Optional[str]
    metrics: dict[str, float]
    model: Any
    """The trained model (a PeftModel when LoRA was used), for in-process use after training."""


def build_trainer(exp: ExperimentConfig, args: TrainingArguments, callbacks: Sequence[Any] = (),
                  **kwargs: Any) -> ReasonKneeTrainer:
    """``ReasonKneeTrainer`` for ``exp`` writing ``metrics.jsonl`` and the progress bar, with ``config.yaml`` saved
    in the output folder (main process); ``kwargs`` go to the Trainer (model, datasets, collator ...)."""
    from transformers.trainer_callback import ProgressCallback

    out = Path(args.output_dir)
    trainer = ReasonKneeTrainer(args=args, experiment=exp,
                                callbacks=[MetricsJsonlCallback(out / "metrics.jsonl"), *callbacks], **kwargs)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(ProgressBarCallback())
    if args.should_save:
        save_experiment_config(exp, out / "config.yaml")
    return trainer


def save_final(trainer: ReasonKneeTrainer) -> Path:
    """Save the trained model to ``<output_dir>/final`` whole or not at all; returns that folder.

    Every rank calls ``save_model`` (sharded models gather there) into a staging folder; the main one swaps it in.
    """
    out = Path(trainer.args.output_dir)
    final, staging = out / "final", out / ".final.tmp"
    if trainer.args.should_save and staging.exists():
        shutil.rmtree(staging)  # left by a run killed while saving; its files must not mix into this one
    trainer.save_model(str(staging))
    if trainer.args.should_save:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    return final
