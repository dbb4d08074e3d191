"""MOAKS grade meanings of the 69 question types: one table for prompts, answer reasoning and phantoms.

The meanings follow the definitions that the release's own guided questions state (MOAKS, Hunter et al.
2011): for example a bone marrow lesion's size grade is the share of the subregion it occupies (<33 %,
33-66 %, >66 %), a cartilage lesion's depth grade is the share of the defect that is full-thickness loss,
meniscal morphology codes 2/3/4 are radial/horizontal/vertical tears and a meniscal cyst's
``tear_location`` is 0 anterior horn, 1 body, 2 posterior horn, 3 no tear.

Each grade has a short text and, where MOAKS defines one, the interval of the measured quantity it stands
for (``Grade.low`` / ``Grade.high`` in ``Grade.unit``). ``prompts.grade_description`` reads the texts;
``data.phantom`` draws lesions inside the intervals (``Grade.target``), so a synthetic answer and the
image it describes agree under the same definition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .schema import QuestionSpec


@dataclass(frozen=True)
class Grade:
    """Meaning of one grade of one field."""

    text: str
    """Short description, e.g. "33-66% of the subregion"."""
    low: Optional[float] = None
    """Lower bound of the measured quantity (inclusive); None when the grade is not a measurement."""
    high: Optional[float] = None
    """Upper bound (exclusive, except when equal to ``low``: the grade is exactly ``low``)."""
    unit: Optional[str] = None
    """What is measured: "fraction of the subregion", "mm", "count"..."""

    def contains(self, value: float) -> bool:
        """Whether a measured ``value`` falls in this grade's interval."""
        if self.low is None or self.high is None:
            raise ValueError(f"grade {self.text!r} has no measured interval")
        if self.low == self.high:
            return math.isclose(value, self.low, abs_tol=1e-9)
        return self.low <= value < self.high

    @property
    def target(self) -> float:
        """A value well inside the interval (its middle; 1.3x the lower bound of an open-ended one)."""
        if self.low is None or self.high is None:
            raise ValueError(f"grade {self.text!r} has no measured interval")
        if math.isinf(self.high):
            return 1.3 * self.low
        return 0.5 * (self.low + self.high)


_INF = math.inf
_THIRD, _TWO_THIRDS = 1.0 / 3.0, 2.0 / 3.0

# Fields whose key is unique to one category.
FIELD_GRADES: dict[str, tuple[Grade, ...]] = {
    "Size of BML (including cyst)": (
        Grade("no bone marrow lesion", 0.0, 0.0, "fraction of the subregion"),
        Grade("less than 33% of the subregion volume", 0.0, _THIRD, "fraction of the subregion"),
        Grade("33-66% of the subregion volume", _THIRD, _TWO_THIRDS, "fraction of the subregion"),
        Grade("more than 66% of the subregion volume", _TWO_THIRDS, 1.0 + 1e-9, "fraction of the subregion")),
    "Number of BML within subregion": (
        Grade("no lesion", 0, 0, "count"), Grade("one lesion", 1, 1, "count"), Grade("two lesions", 2, 2, "count"),
        Grade("three or more lesions", 3, _INF, "count")),
    "% of lesion that is BML (excluding cyst)": (
        Grade("no lesion", 0.0, 0.0, "fraction of the lesion"),
        Grade("less than 33% of the lesion is marrow edema, the rest is cyst", 0.0, _THIRD,
              "fraction of the lesion"),
        Grade("33-66% of the lesion is marrow edema", _THIRD, _TWO_THIRDS, "fraction of the lesion"),
        Grade("more than 66% of the lesion is marrow edema", _TWO_THIRDS, 1.0 + 1e-9, "fraction of the lesion")),
    "Size of lesion": (
        Grade("no cartilage loss", 0.0, 0.0, "fraction of the surface"),
        Grade("less than 10% of the subregion surface", 0.0, 0.10, "fraction of the surface"),
        Grade("10-75% of the subregion surface", 0.10, 0.75, "fraction of the surface"),
        Grade("more than 75% of the subregion surface", 0.75, 1.0 + 1e-9, "fraction of the surface")),
    "Depth of lesion": (
        Grade("no full-thickness loss", 0.0, 0.0, "fraction of the defect"),
        Grade("full-thickness loss in less than 10% of the defect", 0.0, 0.10, "fraction of the defect"),
        Grade("full-thickness loss in 10-75% of the defect", 0.10, 0.75, "fraction of the defect"),
        Grade("full-thickness loss in more than 75% of the defect", 0.75, 1.0 + 1e-9, "fraction of the defect")),
    "morphology": (
        Grade("normal meniscus"), Grade("signal abnormality short of a tear"), Grade("radial tear"),
        Grade("horizontal tear"), Grade("vertical tear"), Grade("complex tear"), Grade("partial maceration"),
        Grade("progressive partial maceration (follow-up only)"), Grade("complete maceration")),
    "Complete Tear": (Grade("continuous fibres"), Grade("complete tear with discontinuous fibres")),
    "Associated with BML/cyst at site of insertion or origin": (
        Grade("normal marrow at the attachment"), Grade("marrow lesion or cyst at the attachment")),
    "ACL Repair": (Grade("native ligament"), Grade("reconstruction graft with bone tunnel")),
    "Signal Abnormality": (Grade("homogeneous low signal"), Grade("increased intratendinous signal")),
}

# Fields whose key ("grade", "presence") is shared across categories: meanings per category.
CATEGORY_GRADES: dict[str, tuple[Grade, ...]] = {
    "osteophyte": (Grade("none"), Grade("small"), Grade("medium"), Grade("large")),
    "hoffa_synovitis": (
        Grade("normal: the fat pad is dark apart from thin linear streaks"),
        Grade("mild: a few small areas of hyperintensity in a dark fat pad"),
        Grade("moderate: moderate areas of hyperintensity in the fat pad"),
        Grade("severe: large areas of hyperintensity in the fat pad")),
    "effusion_synovitis": (
        Grade("physiologic amount of fluid"),
        Grade("small: fluid continuous in the retropatellar space"),
        Grade("medium: slight convexity of the suprapatellar bursa"),
        Grade("large: distension of the joint capsule")),
    "meniscal_extrusion": (
        Grade("less than 2 mm beyond the tibial margin", 0.0, 2.0, "mm"),
        Grade("2-2.9 mm beyond the tibial margin", 2.0, 3.0, "mm"),
        Grade("3-4.9 mm beyond the tibial margin", 3.0, 5.0, "mm"),
        Grade("5 mm or more beyond the tibial margin", 5.0, _INF, "mm")),
}

PRESENCE = (Grade("absent"), Grade("present"))

TEAR_PARTS = ("anterior horn", "body", "posterior horn")
"""Meniscal segment of ``tear_location`` codes 0, 1, 2 (code 3: no tear)."""
NO_TEAR = len(TEAR_PARTS)
"""The ``tear_location`` code for "no tear"."""


def tear_location_grades(compartment: str) -> tuple[Grade, ...]:
    """Meanings of a meniscal cyst's ``tear_location``: 0-2 the torn segment of that meniscus, 3 no tear."""
    return tuple(Grade(f"tear in the {part} of the {compartment} meniscus") for part in TEAR_PARTS) + (
        Grade("no meniscal tear"),)


def field_grades(spec: QuestionSpec, field_key: str) -> tuple[Grade, ...]:
    """Meanings of every grade of one field of a question, in the order of ``spec.field(key).grades``."""
    field = spec.field(field_key)
    if field_key == "tear_location":
        table: Optional[tuple[Grade, ...]] = tear_location_grades(spec.compartment or "")
    else:
        table = FIELD_GRADES.get(field_key) or CATEGORY_GRADES.get(spec.category)
    if table is None and field.grades == (0, 1):
        table = PRESENCE
    if table is None or len(table) != len(field.grades):
        raise KeyError(f"no MOAKS meanings for field {field_key!r} of question {spec.question_id} "
                       f"(category {spec.category!r}, grades {list(field.grades)})")
    return table


def grade_meaning(spec: QuestionSpec, field_key: str, grade: int) -> Grade:
    """Meaning of ``grade`` of one field of a question."""
    field = spec.field(field_key)
    if grade not in field.grades:
        raise ValueError(f"grade {grade!r} of field {field_key!r} (question {spec.question_id}) is not in "
                         f"{list(field.grades)}")
    return field_grades(spec, field_key)[field.grades.index(grade)]


def normal_grade(spec: QuestionSpec, field_key: str) -> int:
    """The grade of a normal knee for one field: 0, except a meniscal cyst's ``tear_location`` (3, no tear)."""
    spec.field(field_key)
    return NO_TEAR if field_key == "tear_location" else 0


def by_key(field_key: str) -> tuple[Grade, ...]:
    """Meanings of a field whose key is unique to one category (``FIELD_GRADES``), for the phantom."""
    try:
        return FIELD_GRADES[field_key]
    except KeyError:
        raise KeyError(f"field {field_key!r} is not a category-specific MOAKS field; expected one of "
                       f"{sorted(FIELD_GRADES)}") from None
