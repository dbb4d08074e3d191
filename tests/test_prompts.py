"""Question wording: every question in both styles, grade descriptions, reasoning templates."""
from __future__ import annotations

import pytest

from reasonknee3d.constants import BOX_END, BOX_START, DIAGNOSIS_PREFIX, LOCATION_PREFIX
from reasonknee3d.prompts import (PROMPT_STYLES, answer_shape, grade_description, location_words, meniscus_part,
                                  question_prompt, reasoning_steps, reasoning_template, region_phrase)
from reasonknee3d.schema import get_question, load_schema

SPECS = list(load_schema().values())


@pytest.mark.parametrize("style", PROMPT_STYLES)
def test_every_question_has_a_distinct_prompt_naming_its_answer_shape(style: str) -> None:
    prompts = {spec.question_id: question_prompt(spec, style) for spec in SPECS}
    assert len(prompts) == 69 and len(set(prompts.values())) == 69
    for spec in SPECS:
        text = prompts[spec.question_id]
        assert answer_shape(spec) in text
        for f in spec.fields:
            assert f'"{f.key}": <{f.grades[0]}-{f.max_grade}>' in text


def test_guided_prompt_adds_grades_box_convention_and_answer_lines() -> None:
    for spec in SPECS:
        text = question_prompt(spec, "guided")
        assert question_prompt(spec, "plain").splitlines()[0] in text
        assert f"{LOCATION_PREFIX} {BOX_START}[start_slice, end_slice, x_min, x_max, y_min, y_max]{BOX_END}" in text
        assert f"{DIAGNOSIS_PREFIX} {answer_shape(spec)}" in text
        assert "step by step" in text
        for f in spec.fields:
            for g in f.grades:
                assert f"{g} = {grade_description(spec, f.key, g)}" in text


def test_answer_shape_of_a_multi_field_question() -> None:
    assert answer_shape(get_question(61)) == ('{"PCL": {"Complete Tear": <0-1>, '
                                              '"Associated with BML/cyst at site of insertion or origin": <0-1>}}')


def test_unknown_style_and_bad_grade_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown prompt style 'fancy'"):
        question_prompt(get_question(1), "fancy")
    with pytest.raises(ValueError, match="grade 4 of field 'Size of lesion'"):
        grade_description(get_question(16), "Size of lesion", 4)
    with pytest.raises(KeyError, match="no field 'size'"):
        grade_description(get_question(16), "size", 1)


def test_grade_descriptions_are_distinct_within_each_field() -> None:
    for spec in SPECS:
        for f in spec.fields:
            texts = [grade_description(spec, f.key, g) for g in f.grades]
            assert len(set(texts)) == len(texts), (spec.question_id, f.key)


def test_region_words_come_from_the_finding_key() -> None:
    assert location_words(get_question(3)) == "medial trochlea"
    assert location_words(get_question(15)) == "subspinous"
    assert location_words(get_question(30)) == "superior"
    assert region_phrase(get_question(19)) == "the medial central cartilage subregion of the femur"
    assert meniscus_part(get_question(44)) == "anterior horn"
    assert meniscus_part(get_question(45)) == "body"  # sideways extrusion is the body's
    assert meniscus_part(get_question(53)) == "posterior horn"
    assert region_phrase(get_question(60)) == "the anterior cruciate ligament (ACL)"
    assert region_phrase(get_question(62)) == "the patellar tendon"
    with pytest.raises(ValueError, match="question 43"):
        location_words(get_question(43))


def test_reasoning_template_covers_every_grade_and_chains_in_field_order() -> None:
    for spec in SPECS:
        template = reasoning_template(spec)
        assert list(template) == list(spec.field_keys)
        for f in spec.fields:
            assert sorted(template[f.key]) == list(f.grades)
    spec = get_question(54)
    steps = reasoning_steps(spec, {"presence": 1, "tear_location": 3})
    assert steps[0] == "Region: the medial parameniscal soft tissue."
    assert steps[-2:] == ["presence: present, grade 1.", "tear_location: no meniscal tear, grade 3."]
    assert len(steps) == 4
