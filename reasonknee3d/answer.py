"""The answer format shared by the synthetic release, the training targets and the scorer.

    <first reasoning step: the region the question is about>
    Location: <|box_start|>[a0_min, a0_max, a1_min, a1_max, a2_min, a2_max]<|box_end|>
    <remaining reasoning steps, one per line>
    Final diagnosis: {"<finding key>": {"<field>": <grade>, ...}}

The original 3DReasonKnee answers put the box after all the reasoning. Here it follows the first step, which
names the region (the synthetic release's ``Region: ...`` line): the model says where the region is, then
grades what it sees there, so every grading step is conditioned on the box and, for a 3D model with
``region_size``, on the region look (``models/reasonknee3d/region.py``). This order also localized better than
writing the box first (docs/results.md). The scorer reads a box wherever it stands, and release answers in
any order load the same way (``data/release.py``). See docs/design.md, "Answer format".
"""
from __future__ import annotations

import json
from typing import Mapping, Optional, Sequence

from .boxes import box_to_text
from .constants import DIAGNOSIS_PREFIX, LOCATION_PREFIX
from .schema import QuestionSpec


def check_severity(spec: QuestionSpec, severity: Mapping[str, int], where: str = "") -> dict[str, int]:
    """Validate ``severity`` against the question's fields and grade ranges; returns it in schema order."""
    at = f" in {where}" if where else ""
    missing = [k for k in spec.field_keys if k not in severity]
    extra = [k for k in severity if k not in spec.field_keys]
    if missing or extra:
        raise ValueError(f"severity{at} for question {spec.question_id} ({spec.finding_key!r}) has missing "
                         f"fields {missing} / unknown fields {extra}; expected exactly {list(spec.field_keys)}")
    out = {}
    for f in spec.fields:
        g = severity[f.key]
        if isinstance(g, bool) or not isinstance(g, int) or g not in f.grades:
            raise ValueError(f"severity{at}: field {f.key!r} of question {spec.question_id} has grade {g!r}; "
                             f"expected an integer in {list(f.grades)}")
        out[f.key] = g
    return out


def diagnosis_json(spec: QuestionSpec, severity: Mapping[str, int]) -> str:
    """``{"<finding key>": {"<field>": grade, ...}}`` on one line."""
    return json.dumps({spec.finding_key: check_severity(spec, severity)}, ensure_ascii=False)


def format_answer(spec: QuestionSpec, reasoning: Sequence[str], box: Optional[Sequence[int]],
                  severity: Mapping[str, int]) -> str:
    """The full answer text: the Location line after the first reasoning step (omitted when the question has
    no box), then the other steps and the diagnosis."""
    lines = [r.strip() for r in reasoning if r.strip()]
    if box is not None:
        lines.insert(min(1, len(lines)), f"{LOCATION_PREFIX} {box_to_text(box)}")
    lines.append(f"{DIAGNOSIS_PREFIX} {diagnosis_json(spec, severity)}")
    return "\n".join(lines)
