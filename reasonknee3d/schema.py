"""The 69 public ReasonKnee question types: category, structure, compartment, finding key, fields, grades.

The schema ships with the package (``resources/question_schema.json``), so the scorer and the synthetic
release need nothing else. ``field_keys`` applies the benchmark's rule (docs/benchmark.md): a null field key is called "grade".
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Optional

from .constants import NULL_FIELD_KEY


@dataclass(frozen=True)
class FieldSpec:
    key: str
    """Severity key as used in references and answers (null in the schema becomes "grade")."""
    grades: tuple[int, ...]
    """Allowed integer grades, ascending."""

    @property
    def max_grade(self) -> int:
        return self.grades[-1]


@dataclass(frozen=True)
class QuestionSpec:
    question_id: int
    category: str
    structure: str
    compartment: Optional[str]
    finding_key: str
    wrapper: Optional[str]
    """JSON wrapper the public prompt asks for (MOAKS_scores / MOAKS_grade / None)."""
    fields: tuple[FieldSpec, ...]

    @property
    def field_keys(self) -> tuple[str, ...]:
        return tuple(f.key for f in self.fields)

    def field(self, key: str) -> FieldSpec:
        for f in self.fields:
            if f.key == key:
                return f
        raise KeyError(f"question {self.question_id} ({self.finding_key!r}) has no field {key!r}; "
                       f"expected one of {list(self.field_keys)}")


@lru_cache(maxsize=1)
def load_schema() -> dict[int, QuestionSpec]:
    """All question specs keyed by question id (cached; the file is read once per process)."""
    text = resources.files("reasonknee3d").joinpath("resources/question_schema.json").read_text()
    out: dict[int, QuestionSpec] = {}
    for q in json.loads(text):
        fields = tuple(FieldSpec(f["key"] if f["key"] is not None else NULL_FIELD_KEY, tuple(f["grades"]))
                       for f in q["fields"])
        out[int(q["question_id"])] = QuestionSpec(
            question_id=int(q["question_id"]), category=q["category"], structure=q["structure"],
            compartment=q["compartment"], finding_key=q["finding_key"], wrapper=q["wrapper_in_prompt"],
            fields=fields)
    return out


def get_question(question_id: int) -> QuestionSpec:
    """Spec of one question; a clear error for an id the schema does not know."""
    schema = load_schema()
    try:
        return schema[int(question_id)]
    except (KeyError, ValueError, TypeError):
        raise KeyError(f"unknown question id {question_id!r}: expected an integer in "
                       f"{min(schema)}..{max(schema)} (reasonknee_question_schema.json)") from None


@lru_cache(maxsize=1)
def null_field_questions() -> frozenset[int]:
    """Ids of the questions whose single field key is null in the schema: their release answers put the
    grade right under the finding key (``{"medial meniscus anterior extrusion": 2}``), not in a field."""
    text = resources.files("reasonknee3d").joinpath("resources/question_schema.json").read_text()
    return frozenset(int(q["question_id"]) for q in json.loads(text)
                     if any(f["key"] is None for f in q["fields"]))


def grade_range(grades: tuple[int, ...]) -> str:
    """``0-3`` for consecutive grades, else the grades joined by commas."""
    if len(grades) > 1 and list(grades) == list(range(grades[0], grades[-1] + 1)):
        return f"{grades[0]}-{grades[-1]}"
    return ",".join(str(g) for g in grades)


def question_rows(category: Optional[str] = None) -> list[dict]:
    """The questions as JSON-ready rows (``reasonknee3d questions``): id, category, region (structure,
    compartment, finding key) and each field with its allowed grades; only ``category`` when given."""
    return [{"question_id": q.question_id, "category": q.category, "structure": q.structure,
             "compartment": q.compartment, "finding_key": q.finding_key,
             "fields": [{"key": f.key, "grades": list(f.grades), "range": grade_range(f.grades)} for f in q.fields]}
            for q in load_schema().values() if category is None or q.category == category]
