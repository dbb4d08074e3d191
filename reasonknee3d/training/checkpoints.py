"""Checkpoint folders that ``from_pretrained`` loads directly, resume detection, and LoRA merging.

Without LoRA a checkpoint is the model's own ``save_pretrained`` output. With LoRA, Trainer writes the
peft adapter (LoRA weights, ``modules_to_save`` copies of the fully trained modules, new token rows);
the untouched base weights are written once per run to ``<output_dir>/base_model`` and hard-linked into
every checkpoint. transformers loads such a folder (config + base weights + embedded adapter) with a
plain ``from_pretrained``, and ``merge_checkpoint`` folds the adapter in for a standalone model.

Trainer writes ``checkpoint-N`` in place, so a killed or out-of-space run can leave a folder with only some
of its files. ``resolve_resume`` therefore resumes from the newest *complete* checkpoint
(``checkpoint_problems``) and moves the incomplete newer ones aside into ``incomplete_checkpoints/``.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from ..attention import NO_HUB_KERNELS
from ..io_utils import atomic_dir

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE_MODEL_DIR = "base_model"
INCOMPLETE_DIR = "incomplete_checkpoints"
"""Sub-folder of a run where ``resolve_resume`` moves incomplete checkpoints (outside Trainer's rotation)."""
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-([0-9]+)$")


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


def _weights_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` holds no complete set of model weights (None when it does)."""
    if has_adapter(folder):
        return None
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return f"{index_name} is unreadable"
            missing = sorted(s for s in shards if not (folder / s).is_file())
            return f"weight shards missing: {', '.join(missing)}" if missing else None
    if any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        return None
    if any(p.is_dir() for p in folder.glob("pytorch_model_fsdp_*")):  # FSDP sharded state dict
        return None
    return "no model weights (model.safetensors, a sharded index, or adapter_model.safetensors + adapter_config.json)"


def checkpoint_problems(folder: str | os.PathLike) -> list[str]:
    """What keeps ``folder`` from being a complete Trainer checkpoint; empty when it is complete.

    Complete means what transformers' ``Trainer._save_checkpoint`` writes, in its order: the weights
    (``save_model``), the optimizer state (``optimizer.pt``; FSDP ``optimizer.bin`` / ``optimizer_*/``,
    DeepSpeed ``global_step*/``), ``scheduler.pt``, the RNG state, and last ``trainer_state.json``. Since the
    state file comes last, a readable one means every earlier file was written whole; the other checks catch
    folders where files were removed or never written. (A separate completion marker would add nothing: the
    Trainer's own last file already plays that role.)
    """
    folder = Path(folder)
    problems = []
    try:
        json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"no {TRAINER_STATE}")
    except (OSError, ValueError):
        problems.append(f"{TRAINER_STATE} is unreadable or cut short")
    weights = _weights_problem(folder)
    if weights:
        problems.append(weights)
    deepspeed = any(p.is_dir() for p in folder.glob("global_step*"))
    optimizer = (deepspeed or any((folder / n).is_file() for n in ("optimizer.pt", "optimizer.bin"))
                 or any(p.is_dir() for p in folder.glob("optimizer_*")))
    if not optimizer:
        problems.append("no optimizer state (optimizer.pt)")
    if not deepspeed and not (folder / "scheduler.pt").is_file():
        problems.append("no scheduler.pt")
    return problems


def _move_aside(folder: Path) -> Path:
    """Move an incomplete checkpoint into ``<run>/incomplete_checkpoints/`` (a free name); returns where."""
    dest_dir = folder.parent / INCOMPLETE_DIR
    dest_dir.mkdir(exist_ok=True)
    dest, n = dest_dir / folder.name, 1
    while dest.exists():
        dest, n = dest_dir / f"{folder.name}.{n}", n + 1
    os.replace(folder, dest)
    return dest


def resolve_resume(resume: str, output_dir: str | os.PathLike) -> Optional[str]:
    """``train.resume`` -> the checkpoint to resume from (None to start fresh).

    ``auto`` picks the newest complete ``checkpoint-N`` in ``output_dir`` if any. Newer incomplete ones
    (see ``checkpoint_problems``) are logged with what they lack and moved into
    ``<output_dir>/incomplete_checkpoints/`` by the main process (rank 0): left in place they would count in
    Trainer's checkpoint rotation and be written over when training reaches their step again. They are
    kept, not deleted, for inspection. ``never`` starts fresh; anything else is a checkpoint folder that must
    exist and be complete.
    """
    if resume == "never":
        return None
    if resume != "auto":
        if not Path(resume).is_dir():
            raise FileNotFoundError(f"train.resume: checkpoint folder {resume} does not exist (or use auto / never)")
        problems = checkpoint_problems(resume)
        if problems:
            raise FileNotFoundError(f"train.resume: {resume} is not a complete checkpoint ({'; '.join(problems)}); "
                                    f"choose another checkpoint, or use auto / never")
        return resume
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = sorted(((int(m.group(1)), p) for p in out.iterdir()
                    if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()), reverse=True)
    main_process = os.environ.get("RANK", "0") == "0"
    for _, folder in found:
        problems = checkpoint_problems(folder)
        if not problems:
            logger.info("train.resume auto: resuming from %s", folder)
            return str(folder)
        where = "left in place"
        if main_process:
            try:
                where = f"moved to {_move_aside(folder)}"
            except OSError as err:
                where = f"left in place (moving it failed: {err})"
        logger.warning("train.resume auto: ignoring incomplete checkpoint %s (%s); %s", folder,
                       "; ".join(problems), where)
    return None


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
        base = model_class.from_pretrained(base_view, **NO_HUB_KERNELS)
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
