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

from ..constants import DEFAULT_BOX_DECODING


@dataclass
class InferResult:
    text: str
    """Raw answer text (boxes as voxel indices of the input volume)."""
    box: Optional[list[int]]
    severity: dict[str, Optional[int]]
    png: Optional[Path]


@torch.no_grad()
def infer(model_dir: str | os.PathLike, volume: str | os.PathLike, question_id: int,
          gt_box: Optional[Sequence[int]] = None, png: Optional[str | os.PathLike] = None,
          prompt: Optional[str] = None, constrained: bool = True, max_new_tokens: int = 512,
          knee_side: Optional[str] = None, box_decoding: str = DEFAULT_BOX_DECODING) -> InferResult:
    """Answer question ``question_id`` about the NIfTI ``volume`` with the model in ``model_dir``.

    ``knee_side`` ('left' / 'right') is needed only when the model was trained with a ``canonical_side`` and the
    file name does not end in ``_left`` / ``_right``; boxes come back in the stored volume's voxels (also when the
    model was trained with ``data.recentre``).
    ``box_decoding``: how constrained decoding picks box coordinates (``constants.BOX_DECODINGS``).
    """
    from ..attention import select_attn_implementation
    from ..data.io import load_volume
    from ..families import family_of_model_dir
    from ..prompts import question_prompt
    from ..schema import get_question
    from .generate import generate_answers
    from ..parsing import parse_output

    spec = get_question(question_id)
    volume = Path(volume)
    array, meta = load_volume(volume)  # validates the file and gives the shape boxes refer to
    if gt_box is not None:  # before the model loads: a reference box outside the volume is a usage error
        from ..boxes import validate_box
        try:
            gt_box = validate_box(gt_box, meta.shape)
        except ValueError as e:
            raise ValueError(f"reference box (--box): {e}") from None
    family = family_of_model_dir(model_dir)
    model, processor = family.load(model_dir, select_attn_implementation("auto"))
    model.eval()
    batch, frame = family.file_batch(model, processor, volume, prompt or question_prompt(spec), knee_side)
    text = generate_answers(model, processor, family, batch, [question_id], [meta.shape], True,
                            constrained=constrained, max_new_tokens=max_new_tokens, box_decoding=box_decoding)[0]
    # An untrained or briefly trained model can pad lines with runs of spaces; they carry nothing.
    text = "\n".join(line.rstrip() for line in text.strip().splitlines())
    if frame is not None:  # the model saw this knee mirrored (canonical_side) or moved (recentre)
        text = frame.text_to_stored(text)
    parsed = parse_output(text, spec)
    out_png = None
    if png is not None:
        from .visualize import render_box_overlay
        answer = text.split("\n")[-1] if text else "(no answer)"
        out_png = render_box_overlay(array, png, pred_box=parsed.box, gt_box=gt_box,
                                     title=f"q{question_id}: {spec.finding_key} — {volume.name}", answer=answer)
    return InferResult(text=text, box=parsed.box, severity=dict(parsed.severity), png=out_png)


def answer_question(model_dir: str | os.PathLike, volume: str | os.PathLike, question_id: int,
                    knee_side: Optional[str] = None, max_new_tokens: int = 512) -> InferResult:
    """The package's one-call Python API: a parsed, constrained answer to one question about one volume.

    ``model_dir`` is any model folder the package wrote (``reasonknee3d demo`` writes
    ``demo_out/runs/3d/final``), of either family; ``volume`` a NIfTI file; ``question_id`` 1..69
    (``reasonknee3d questions``). The answer is decoded under the same constraints as ``predict`` (every box
    and grade parseable) and parsed with the scorer's parser: ``.box`` is ``[s0, s1, h0, h1, w0, w1]``
    (inclusive voxel indices of the stored volume) or None, ``.severity`` maps each field of the question to
    its grade, ``.text`` is the whole answer. ``infer`` adds a prompt of one's own, unconstrained decoding and
    the overlay picture.
    """
    from ..schema import get_question
    get_question(question_id)  # an unknown id fails here, naming the valid range, before the model loads
    return infer(model_dir, volume, question_id, knee_side=knee_side, max_new_tokens=max_new_tokens)
