"""`reasonknee3d infer`: one question about one volume -> reasoning, box, severity JSON and a picture.

Works for both families (3D-native and slice baseline): the model folder's config says which. The answer is
generated with the same constrained decoding as ``predict`` and parsed with the scorer's parser.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch


@dataclass
class InferResult:
    text: str
    """Raw answer text (boxes as voxel indices of the input volume)."""
    box: Optional[list[int]]
    severity: dict[str, Optional[int]]
    png: Optional[Path]


@dataclass
class _OneSample:
    """The fields of data.release.Sample the collators read."""
    sample_id: str
    image_path: Path
    question_id: int
    prompt: str
    box: Optional[list[int]]
    answer: str = ""


@torch.no_grad()
def infer(model_dir: str | os.PathLike, volume: str | os.PathLike, question_id: int,
          gt_box: Optional[Sequence[int]] = None, png: Optional[str | os.PathLike] = None,
          prompt: Optional[str] = None, constrained: bool = True, max_new_tokens: int = 512,
          knee_side: Optional[str] = None) -> InferResult:
    """Answer question ``question_id`` about the NIfTI ``volume`` with the model in ``model_dir``.

    ``knee_side`` ('left' / 'right') is needed only when the model was trained with a ``canonical_side`` and the
    file name does not end in ``_left`` / ``_right``; boxes come back in the stored volume's voxels.
    """
    from ..attention import select_attn_implementation
    from ..data.io import load_volume
    from ..models.generation import constrained_logits_processors
    from ..prompts import question_prompt
    from ..schema import get_question
    from ..training.families import family_of_model_dir
    from .parsing import parse_output

    spec = get_question(question_id)
    volume = Path(volume)
    array, meta = load_volume(volume)  # validates the file and gives the shape boxes refer to
    sample = _OneSample(f"{volume.name}:q{question_id}", volume, question_id, prompt or question_prompt(spec),
                        list(gt_box) if gt_box is not None else None)
    family = family_of_model_dir(model_dir)
    model, processor = family.load(model_dir, select_attn_implementation("auto"))
    model.eval()
    mirrored = False
    if family.__class__.__name__ == "SliceFamily":
        from ..models.slice_baseline import SliceCollator, slice_config_of
        batch, _ = SliceCollator(processor, slice_config_of(model), None, train=False).collate([sample])
    else:
        from ..data.transforms import preprocess_volume
        prep = processor.preprocess_config()
        mirrored = prep.mirrors(volume, knee_side)
        model_input, _ = preprocess_volume(volume, prep, knee_side)
        batch = dict(processor([model_input], [sample.prompt], orig_shapes=[meta.shape]))
    tokenizer = processor.tokenizer
    processors = (constrained_logits_processors(tokenizer, [question_id], max_new_tokens,
                                                num_bins=family.num_bins(model), require_box=True)
                  if constrained else None)
    generated = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                               logits_processor=processors, pad_token_id=tokenizer.pad_token_id)
    text = family.decode(model, processor, generated[:, batch["input_ids"].shape[1]:], [meta.shape])[0]
    if mirrored:  # the model saw this knee in the canonical side's frame
        from ..boxes import mirror_text_boxes
        text = mirror_text_boxes(text, meta.shape)
    parsed = parse_output(text, spec)
    out_png = None
    if png is not None:
        from .visualize import render_box_overlay
        answer = text.split("\n")[-1] if text else "(no answer)"
        out_png = render_box_overlay(array, png, pred_box=parsed.box, gt_box=gt_box,
                                     title=f"q{question_id}: {spec.finding_key} — {volume.name}", answer=answer)
    return InferResult(text=text, box=parsed.box, severity=dict(parsed.severity), png=out_png)
