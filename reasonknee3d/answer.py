"""The answer format shared by the synthetic release, the training targets and the scorer (DESIGN.md).

    <reasoning steps, one per line>
    Location: <|box_start|>[a0_min, a0_max, a1_min, a1_max, a2_min, a2_max]<|box_end|>
    Final diagnosis: {"<finding key>": {"<field>": <grade>, ...}}
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
    """The full answer text; the Location line is omitted when the question has no box."""
    lines = [r.strip() for r in reasoning if r.strip()]
    if box is not None:
        lines.append(f"{LOCATION_PREFIX} {box_to_text(box)}")
    lines.append(f"{DIAGNOSIS_PREFIX} {diagnosis_json(spec, severity)}")
    return "\n".join(lines)
