"""The MOAKS table: a meaning for every (question, field, grade), as the release's guided questions define them."""
from __future__ import annotations

import math

import pytest

from reasonknee3d import moaks
from reasonknee3d.prompts import grade_description, question_prompt, reasoning_steps
from reasonknee3d.schema import get_question, load_schema


def test_every_question_field_and_grade_has_a_distinct_meaning() -> None:
    n = 0
    for spec in load_schema().values():
        for f in spec.fields:
            meanings = [moaks.grade_meaning(spec, f.key, g) for g in f.grades]
            assert len({m.text for m in meanings}) == len(meanings), (spec.question_id, f.key)
            n += len(meanings)
            # The prompts read the same table.
            assert [grade_description(spec, f.key, g) for g in f.grades] == [m.text for m in meanings]
    assert n > 69 * 2


def test_measured_grades_tile_their_quantity_without_gaps() -> None:
    for spec in load_schema().values():
        for f in spec.fields:
            meanings = moaks.field_grades(spec, f.key)
            if meanings[0].low is None:
                continue
            assert len({m.unit for m in meanings}) == 1
            if meanings[0].unit == "count":  # whole numbers: 0, 1, 2, 3 or more
                assert [m.low for m in meanings] == [0, 1, 2, 3] and meanings[3].contains(7)
                continue
            for prev, nxt in zip(meanings[1:], meanings[2:]):
                assert prev.high == nxt.low, (spec.question_id, f.key)
            for m in meanings:
                assert m.contains(m.target), (spec.question_id, f.key, m.text)


@pytest.mark.parametrize("field,grade,inside,outside", [
    ("Size of BML (including cyst)", 1, 0.30, 0.34),
    ("Size of BML (including cyst)", 2, 0.50, 0.70),
    ("Size of BML (including cyst)", 3, 0.70, 0.60),
    ("% of lesion that is BML (excluding cyst)", 2, 0.40, 0.20),
    ("Size of lesion", 1, 0.05, 0.12),
    ("Size of lesion", 2, 0.60, 0.80),
    ("Depth of lesion", 3, 0.80, 0.50),
])
def test_interval_bounds_follow_moaks(field: str, grade: int, inside: float, outside: float) -> None:
    m = moaks.by_key(field)[grade]
    assert m.contains(inside) and not m.contains(outside)


def test_upstream_definitions_of_codes() -> None:
    morph = [moaks.grade_meaning(get_question(48), "morphology", g).text for g in range(9)]
    assert ("radial" in morph[2] and "horizontal" in morph[3] and "vertical" in morph[4]
            and "complex" in morph[5] and "complete maceration" == morph[8])
    assert "progressive partial maceration" in morph[7]
    cyst = get_question(55)
    tears = [moaks.grade_meaning(cyst, "tear_location", g).text for g in range(4)]
    assert tears[:3] == ["tear in the anterior horn of the lateral meniscus", "tear in the body of the lateral meniscus",
                         "tear in the posterior horn of the lateral meniscus"]
    assert tears[3] == "no meniscal tear" and moaks.normal_grade(cyst, "tear_location") == moaks.NO_TEAR == 3
    assert moaks.normal_grade(cyst, "presence") == 0
    ext = moaks.field_grades(get_question(44), "grade")
    assert [(m.low, m.high) for m in ext] == [(0.0, 2.0), (2.0, 3.0), (3.0, 5.0), (5.0, math.inf)]
    assert ext[3].contains(5.0) and ext[1].contains(2.9) and not ext[1].contains(3.0)
    assert [m.text for m in moaks.field_grades(get_question(30), "grade")] == ["none", "small", "medium", "large"]
    depth = moaks.grade_meaning(get_question(16), "Depth of lesion", 0)
    assert depth.text == "no full-thickness loss" and depth.contains(0.0) and not depth.contains(0.05)


def test_prompts_and_reasoning_state_the_table() -> None:
    spec = get_question(1)
    text = question_prompt(spec, "guided")
    assert "1 = less than 33% of the subregion volume" in text and "3 = more than 66% of the subregion volume" in text
    steps = reasoning_steps(get_question(16), {"Size of lesion": 2, "Depth of lesion": 3})
    assert steps[-2:] == ["Size of lesion: 10-75% of the subregion surface, grade 2.",
                          "Depth of lesion: full-thickness loss in more than 75% of the defect, grade 3."]


def test_bad_lookups_name_what_was_expected() -> None:
    with pytest.raises(ValueError, match="grade 9 of field 'morphology'"):
        moaks.grade_meaning(get_question(48), "morphology", 9)
    with pytest.raises(KeyError, match="no field 'depth'"):
        moaks.grade_meaning(get_question(16), "depth", 1)
    with pytest.raises(KeyError, match="not a category-specific MOAKS field"):
        moaks.by_key("grade")
    with pytest.raises(ValueError, match="no measured interval"):
        moaks.grade_meaning(get_question(48), "morphology", 2).contains(1.0)
