"""``reasonknee3d predict``: a trained model folder -> scorer-ready predictions JSONL, resumable.

Works for either family (detected from the folder's config.json). Samples are generated in left-padded
batches of similar prompt length with the KV cache; with ``constrained`` the model's box and severity
logits processors make every answer parseable. Each finished sample is appended (``predictions_io``),
so a killed run restarted with the same command skips what is done.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..attention import select_attn_implementation
from ..boxes import mirror_text_boxes
from .generate import generate_answers
from .predictions_io import PredictionWriter

logger = logging.getLogger(__name__)


@dataclass
class PredictResult:
    """What one ``predict`` call did."""

    out: Path
    n_split: int
    """Samples of the split considered (after ``limit``)."""
    n_skipped: int
    """Already in ``out`` from an earlier run."""
    n_written: int
    seconds: float


@torch.no_grad()
def predict(model_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str, out: str | os.PathLike,
            batch_size: int = 4, limit: Optional[int] = None, constrained: bool = True, max_new_tokens: int = 512,
            attn_implementation: str = "auto", num_workers: int = 0) -> PredictResult:
    """Generate an answer for each sample of ``split`` (the first ``limit`` ones) and append them to ``out``.

    Rows are ``{"sample_id", "question_id", "output"}`` (the scorer's prediction format; ``output`` holds
    boxes as voxel indices of each original volume).
    """
    from ..families import family_of_model_dir

    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 0):
        raise ValueError(f"batch_size {batch_size} and max_new_tokens {max_new_tokens} must be >= 1, limit >= 0 "
                         f"(got {limit})")
    start = time.perf_counter()
    family = family_of_model_dir(model_dir)
    model, processor = family.load(model_dir, select_attn_implementation(attn_implementation))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    dataset, collate = family.predict_data(model, processor, data_dir, split)
    samples = dataset.samples[:limit] if limit is not None else dataset.samples

    with PredictionWriter(out) as writer:
        todo = [i for i, s in enumerate(samples) if s.sample_id not in writer.done]
        # Similar prompt lengths in one batch: left padding then wastes little.
        todo.sort(key=lambda i: len(samples[i].prompt))
        loader = DataLoader(Subset(dataset, todo), batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
        written = 0
        bar = tqdm(total=len(todo), desc=f"predict {split}", unit="sample", dynamic_ncols=True)
        for batch, infos in loader:
            texts = generate_answers(model, processor, family, batch, [info.question_id for info in infos],
                                     [info.orig_shape for info in infos], [info.has_box for info in infos],
                                     constrained=constrained, max_new_tokens=max_new_tokens)
            # Boxes of volumes the model saw mirrored (canonical_side) go back to the stored volume's voxels.
            texts = [mirror_text_boxes(t, info.orig_shape) if info.mirrored else t for t, info in zip(texts, infos)]
            for info, text in zip(infos, texts):
                written += writer.write({"sample_id": info.sample_id, "question_id": info.question_id,
                                         "output": text})
            bar.update(len(infos))
        bar.close()
    result = PredictResult(out=Path(out), n_split=len(samples), n_skipped=len(samples) - len(todo),
                           n_written=written, seconds=time.perf_counter() - start)
    logger.info("predict: %s", result)
    return result
