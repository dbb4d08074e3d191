"""Checkpoint folders that ``from_pretrained`` loads directly, resume detection, and LoRA merging.

Without LoRA a checkpoint is the model's own ``save_pretrained`` output. With LoRA, Trainer writes the
peft adapter (LoRA weights, ``modules_to_save`` copies of the fully trained modules, new token rows);
the untouched base weights are written once per run to ``<output_dir>/base_model`` and hard-linked into
every checkpoint. transformers loads such a folder (config + base weights + embedded adapter) with a
plain ``from_pretrained``, and ``merge_checkpoint`` folds the adapter in for a standalone model.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from transformers.trainer_utils import get_last_checkpoint

from ..io_utils import atomic_dir

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE_MODEL_DIR = "base_model"


def has_adapter(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a peft adapter."""
    return all((Path(folder) / name).is_file() for name in ADAPTER_FILES)


def link_base_files(base_dir: str | os.PathLike, folder: str | os.PathLike) -> None:
    """Hard-link (copy where links are unsupported) the base model's weights and config into ``folder``.

    Files the folder already has (the adapter, tokenizer and processor files) are kept.
    """
    folder = Path(folder)
    for src in Path(base_dir).iterdir():
        dst = folder / src.name
        if not src.is_file() or dst.exists():
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Optional[str]:
    """``train.resume`` -> the checkpoint to resume from (None to start fresh).

    ``auto`` picks the newest ``checkpoint-N`` in ``output_dir`` if any; ``never`` starts fresh; anything
    else is a checkpoint folder that must exist.
    """
    if resume == "never":
        return None
    if resume == "auto":
        return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"train.resume: checkpoint folder {resume} does not exist (or use auto / never)")
    return resume


def merge_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, model_class: type) -> Path:
    """Write ``out``: the model of ``checkpoint`` with its LoRA adapter merged in, plus its other files.

    ``model_class`` is the transformers class of the base model (e.g. the family's model class).
    """
    from peft import PeftModel

    checkpoint, out = Path(checkpoint), Path(out)
    if not has_adapter(checkpoint):
        raise ValueError(f"{checkpoint}: no LoRA adapter ({', '.join(ADAPTER_FILES)}) to merge")
    with atomic_dir(out) as tmp:
        # The folder itself would load with the adapter attached; load the base from a view without it.
        base_view = tmp / ".base"
        base_view.mkdir()
        for src in checkpoint.iterdir():
            if src.is_file() and src.name not in ADAPTER_FILES:
                os.symlink(src.resolve(), base_view / src.name)
        base = model_class.from_pretrained(base_view)
        merged = PeftModel.from_pretrained(base, checkpoint).merge_and_unload()
        shutil.rmtree(base_view)
        merged.save_pretrained(tmp)
        written = {p.name for p in tmp.iterdir()}
        for src in checkpoint.iterdir():
            # Tokenizer / processor / experiment files travel along; weights were re-saved merged and the
            # optimizer / scheduler / RNG state belongs to the run, not to the model.
            if (src.is_file() and src.name not in written and src.name not in ADAPTER_FILES
                    and not src.name.startswith(("model", "optimizer", "scheduler", "rng_state", "scaler"))
                    and src.name not in ("trainer_state.json", "training_args.bin")):
                shutil.copy2(src, tmp / src.name)
    return out
