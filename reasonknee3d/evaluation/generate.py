"""The one generation path: a family's batch -> greedy (optionally constrained) ``generate`` -> answer texts.

``predict``, ``infer`` and the local zero-shot runner all call ``generate_answers``; only how the batch is
made differs. Boxes in the returned texts are voxel indices of each source volume as the model saw it (the
caller moves them back, ``data.frame.VolumeFrame.text_to_stored``, for volumes seen mirrored or re-centred).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from transformers.utils import ModelOutput

from ..constants import DEFAULT_BOX_DECODING


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``; ModelOutputs and tuples keep their type."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, ModelOutput):  # e.g. the slice family's cached vision features
        return type(obj)(**{k: to_device(v, device) for k, v in obj.items()})
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@torch.no_grad()
def generate_answers(model: Any, processor: Any, family: Any, batch: dict[str, Any], question_ids: Sequence[int],
                     orig_shapes: Sequence[Sequence[int]], require_box: Sequence[bool] | bool = True,
                     constrained: bool = True, max_new_tokens: int = 512, box_decoding: str = DEFAULT_BOX_DECODING,
                     decode: Optional[Callable[[torch.Tensor], list[str]]] = None,
                     grade_prior: Optional[Any] = None) -> list[str]:
    """Answer texts for one left-padded generation batch.

    ``constrained`` adds the box and severity logits processors (``models.generation``), so every answer of a
    trained model parses (``box_decoding``: how the box's coordinates are chosen, ``constants.BOX_DECODINGS``);
    zero-shot models, which never saw the box tokens, decode unconstrained. The generated
    ids (prompt removed) become text through ``family.decode`` (boxes back in each volume's voxels), or through
    ``decode`` when given (then ``family`` may be None for an unconstrained run). ``grade_prior``
    (``models.grade_prior.GradePrior``, constrained runs only) corrects the grade wordings for the train prior.
    """
    tokenizer = processor.tokenizer
    processors = None
    if constrained:
        from ..models.generation import constrained_logits_processors
        processors = constrained_logits_processors(tokenizer, list(question_ids), max_new_tokens,
                                                   num_bins=family.num_bins(model), require_box=require_box,
                                                   box_decoding=box_decoding, grade_prior=grade_prior)
    batch = to_device(batch, next(model.parameters()).device)
    generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                               logits_processor=processors, pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    if decode is not None:
        return decode(generated[:, width:].cpu())
    return family.decode(model, processor, generated[:, width:].cpu(), orig_shapes)
