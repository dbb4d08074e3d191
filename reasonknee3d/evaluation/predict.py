"""``reasonknee3d predict``: a trained model folder -> scorer-ready predictions JSONL, resumable.

Works for either family (detected from the folder's config.json). Samples are generated in left-padded
batches of similar prompt length with the KV cache; with ``constrained`` the model's box and severity
logits processors make every answer parseable. Each finished sample is appended (``predictions_io``),
so a killed run restarted with the same command skips what is done.

One bad sample does not end the run: a sample whose volume failed preprocessing (left out by the family's
data step), or whose item fails to load or collate, is skipped and listed in ``<out stem>.skipped.jsonl``
(``data.release.Skipped``: sample id and reason) while the others are predicted; a rerun tries it again.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..attention import select_attn_implementation
from ..constants import BOX_DECODINGS, DEFAULT_BOX_DECODING
from ..data.release import Skipped, write_skipped
from .generate import generate_answers
from .predictions_io import PredictionWriter

if TYPE_CHECKING:
    from ..families.registry import SampleInfo

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
    skipped: list[Skipped] = field(default_factory=list)
    """Samples not predicted in this run (item = sample id), with the reason."""
    skipped_path: Optional[Path] = None
    """``<out stem>.skipped.jsonl`` listing ``skipped`` (None when nothing was skipped)."""
    grade_prior: Optional[str] = None
    """``GradePrior.summary()`` of the correction used (None: none)."""


def skipped_path_for(out: str | os.PathLike) -> Path:
    """Where ``predict`` lists the samples it skipped: ``P.jsonl`` -> ``P.skipped.jsonl``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".skipped.jsonl")


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class _GuardedItems(Dataset):
    """``(index, item, None)`` or ``(index, None, error text)``: an item that fails to load is reported, not raised."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any, Optional[str]]:
        try:
            return index, self.dataset[index], None
        except Exception as err:  # noqa: BLE001 - any load/preprocess failure of one item skips that item
            return index, None, _error_text(err)


class _GuardedCollate:
    """The family's collate over the items that loaded; when it fails, each item alone finds the bad ones.

    Returns ``(batch or None, infos, [(index, reason), ...])``. A class, so DataLoader workers can pickle it.
    """

    def __init__(self, collate: Callable[[list[Any]], tuple[Any, list[Any]]]) -> None:
        self.collate = collate

    def __call__(self, rows: Sequence[tuple[int, Any, Optional[str]]]) -> tuple[Any, list[Any], list[tuple[int, str]]]:
        failed = [(i, err) for i, _, err in rows if err is not None]
        good = [(i, item) for i, item, err in rows if err is None]
        try:
            batch, infos = self.collate([item for _, item in good]) if good else (None, [])
            return batch, infos, failed
        except Exception:  # noqa: BLE001 - find which items fail on their own
            pass
        kept = []
        for i, item in good:
            try:
                self.collate([item])
                kept.append(item)
            except Exception as err:  # noqa: BLE001
                failed.append((i, _error_text(err)))
        batch, infos = self.collate(kept) if kept else (None, [])
        return batch, infos, failed


def _preprocess_reasons(cache_dir: Path) -> dict[str, str]:
    """volume id -> reason, from the ``preprocess_skipped.jsonl`` lists under the cache root."""
    from ..data.cache import SKIPPED_FILE
    reasons: dict[str, str] = {}
    for path in sorted(cache_dir.rglob(SKIPPED_FILE)):
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                reasons[str(row["item"]).split(" ", 1)[-1]] = f"{row['reason']} (listed in {path})"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return reasons


def _left_out(data_dir: str | os.PathLike, split: str, kept: Sequence[Any], limit: Optional[int],
              images: Optional[str | os.PathLike], cache_dir: Path) -> tuple[list[str], list[Skipped]]:
    """The split's first ``limit`` sample ids, and as ``Skipped``: the items the release reader cannot use and
    the samples the family's data step left out (their volume failed to load or preprocess)."""
    from ..data.release import iter_samples
    unusable: list[Skipped] = []
    wanted = list(iter_samples(data_dir, split, unusable, images=images))
    wanted = wanted[:limit] if limit is not None else wanted
    have = {s.sample_id for s in kept}
    missing = [s for s in wanted if s.sample_id not in have]
    reasons = _preprocess_reasons(cache_dir) if missing else {}
    return ([s.sample_id for s in wanted],
            [Skipped(sk.item, f"unusable release item: {sk.reason}", sk.kind) for sk in unusable]
            + [Skipped(s.sample_id, "volume failed to load or preprocess: "
                       + reasons.get(s.volume_id, f"no preprocessed entry for {s.image_path}")) for s in missing])


def skipped_summary(skipped: Sequence[Skipped], examples: int = 3) -> list[str]:
    """Console lines: one per reason kind (the text before the first ':'), with its count, the first sample
    ids and the first full reason."""
    groups: dict[str, list[Skipped]] = {}
    for sk in skipped:
        groups.setdefault(sk.reason.split(":", 1)[0], []).append(sk)
    lines = []
    for kind, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        ids = ", ".join(sk.item for sk in items[:examples]) + (", ..." if len(items) > examples else "")
        lines.append(f"  {len(items)} x {kind} (e.g. {ids}): {' '.join(items[0].reason.split())}")
    return lines


def stored_frame_text(text: str, info: "SampleInfo") -> str:
    """A generated answer with its boxes back in the stored volume's voxels: volumes the model saw in another frame
    (mirrored by ``canonical_side``, moved by ``recentre``; ``info.frame``) have their boxes moved back."""
    return text if info.frame is None else info.frame.text_to_stored(text)


@torch.no_grad()
def predict(model_dir: str | os.PathLike, data_dir: str | os.PathLike, split: str, out: str | os.PathLike,
            batch_size: int = 4, limit: Optional[int] = None, constrained: bool = True, max_new_tokens: int = 512,
            attn_implementation: str = "auto", num_workers: int = 0, images: Optional[str | os.PathLike] = None,
            cache_dir: Optional[str | os.PathLike] = None, box_decoding: str = DEFAULT_BOX_DECODING,
            grade_prior_tau: float = 0.0, grade_prior_split: str = "train") -> PredictResult:
    """Generate an answer for each sample of ``split`` (the first ``limit`` ones) and append them to ``out``.

    Rows are ``{"sample_id", "question_id", "output"}`` (the scorer's prediction format; ``output`` holds
    boxes as voxel indices of each original volume). ``images``: where volumes are found by name when the
    release's written paths do not exist; ``cache_dir``: the cache root (default ``<data_dir>/cache``);
    ``box_decoding``: how constrained decoding picks box coordinates (``constants.BOX_DECODINGS``);
    ``grade_prior_tau`` > 0: constrained decoding divides each grade's probability by its frequency in the
    release's ``grade_prior_split`` to that power (``models.grade_prior``; choose it on val with
    ``evaluation.tune_prior.tune_grade_prior``).
    """
    from ..data.release import cache_root
    from ..families import family_of_model_dir

    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 0):
        raise ValueError(f"batch_size {batch_size} and max_new_tokens {max_new_tokens} must be >= 1, limit >= 0 "
                         f"(got {limit})")
    if box_decoding not in BOX_DECODINGS:
        raise ValueError(f"box_decoding must be one of {BOX_DECODINGS}, got {box_decoding!r}")
    if grade_prior_tau and not constrained:
        raise ValueError(f"grade_prior_tau {grade_prior_tau} needs constrained decoding (the correction is one of "
                         "its logits processors)")
    settings = {"constrained": constrained, "max_new_tokens": max_new_tokens, "box_decoding": box_decoding,
                "grade_prior_tau": float(grade_prior_tau), "grade_prior_split": grade_prior_split}
    PredictionWriter.check_settings(out, settings)  # a file of other settings is refused before the model loads
    start = time.perf_counter()
    family = family_of_model_dir(model_dir)
    model, processor = family.load(model_dir, select_attn_implementation(attn_implementation))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    grade_prior = None
    if grade_prior_tau:
        from ..models.grade_prior import GradePrior
        grade_prior = GradePrior.from_release(data_dir, processor.tokenizer, grade_prior_tau, grade_prior_split,
                                              images=images)
        logger.info("predict: %s", grade_prior.summary())
    dataset, collate = family.predict_data(model, processor, data_dir, split, images, cache_dir)
    wanted_ids, skipped = _left_out(data_dir, split, dataset.samples, limit, images, cache_root(data_dir, cache_dir))
    wanted = set(wanted_ids)
    samples = dataset.samples

    with PredictionWriter(out, settings) as writer:
        todo = [i for i, s in enumerate(samples) if s.sample_id in wanted and s.sample_id not in writer.done]
        already = sum(1 for s in samples if s.sample_id in wanted and s.sample_id in writer.done)
        skipped = [sk for sk in skipped if sk.item not in writer.done]  # predicted by an earlier run
        # Similar prompt lengths in one batch: left padding then wastes little.
        todo.sort(key=lambda i: len(samples[i].prompt))
        loader = DataLoader(Subset(_GuardedItems(dataset), todo), batch_size=batch_size,
                            collate_fn=_GuardedCollate(collate), num_workers=num_workers)
        written = 0
        bar = tqdm(total=len(todo), desc=f"predict {split}", unit="sample", dynamic_ncols=True)
        for batch, infos, failed in loader:
            for index, reason in failed:
                skipped.append(Skipped(samples[index].sample_id, reason))
                logger.warning("predict: skipped %s: %s", samples[index].sample_id, reason)
            bar.update(len(failed))
            if batch is None:
                continue
            texts = generate_answers(model, processor, family, batch, [info.question_id for info in infos],
                                     [info.orig_shape for info in infos], [info.has_box for info in infos],
                                     constrained=constrained, max_new_tokens=max_new_tokens,
                                     box_decoding=box_decoding, grade_prior=grade_prior)
            texts = [stored_frame_text(t, info) for t, info in zip(texts, infos)]
            for info, text in zip(infos, texts):
                written += writer.write({"sample_id": info.sample_id, "question_id": info.question_id,
                                         "output": text})
            bar.update(len(infos))
        bar.close()
    result = PredictResult(out=Path(out), n_split=len(wanted_ids), n_skipped=already,
                           n_written=written, seconds=time.perf_counter() - start, skipped=skipped,
                           skipped_path=write_skipped(skipped_path_for(out), skipped),
                           grade_prior=None if grade_prior is None else grade_prior.summary())
    logger.info("predict: %s", result)
    return result
