"""``PretrainParts``: what an encoder pretraining stage hands the runner (``pretrain.py``).

A leaf module, so that a stage module can build its parts without importing the runner that imports the stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn
from torch.utils.data import Dataset


@dataclass
class PretrainParts:
    """What a pretraining stage trains on and what it writes besides the encoder."""

    model: nn.Module
    """Has ``.encoder``; ``forward(**batch)`` returns ``{"loss": tensor}``; may define ``log_metrics()``."""
    dataset: Dataset
    collator: Callable[[list[Any]], dict[str, Any]]
    save_extras: Callable[[Path, nn.Module], None]
    """Writes the stage's own files into the output folder (main process only, after training)."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(item, why) left out of training, listed in ``skipped.jsonl``."""
