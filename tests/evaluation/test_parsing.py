"""parse_output: the package's own answers round-trip, zero-shot mess is read, and no string makes it raise."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reasonknee3d.answer import format_answer
from reasonknee3d.constants import BOX_END, BOX_START
from reasonknee3d.parsing import MAX_CHARS, ParsedOutput, parse_output, parse_outputs
from reasonknee3d.schema import get_question, load_schema

BML = get_question(1)  # three fields, finding key "patella medial BML", grades 0-3
OSTEO = get_question(30)  # one field "grade"
EXTRUSION = get_question(44)  # schema field key null -> "grade"
MORPH = get_question(48)  # "morphology", grades 0-8
SIZE, NUMBER, PERCENT = BML.field_keys


def sev(p: ParsedOutput) -> list:
    return list(p.severity.values())


def test_own_format_round_trips_for_every_question() -> None:
    for spec in load_schema().values():
        severity = {f.key: f.grades[-1] for f in spec.fields}
        box = [1, 5, 20, 31, 7, 7]
        p = parse_output(format_answer(spec, ["step one", "step two"], box, severity), spec)
        assert p.severity == severity and p.severity_found
        assert p.box == box and not p.box_repaired and p.invalid_grades == 0


@settings(max_examples=60, deadline=None)
@given(qid=st.sampled_from(sorted(load_schema())), data=st.data(),
       box=st.lists(st.integers(0, 999_999), min_size=6, max_size=6))
def test_own_format_round_trip_property(qid: int, data: st.DataObject, box: list[int]) -> None:
    spec = load_schema()[qid]
    severity = {f.key: data.draw(st.sampled_from(f.grades)) for f in spec.fields}
    box = [min(box[0], box[1]), max(box[0], box[1]), min(box[2], box[3]), max(box[2], box[3]),
           min(box[4], box[5]), max(box[4], box[5])]
    p = parse_output(format_answer(spec, ["reasoning"], box, severity), spec)
    assert (p.severity, p.box) == (severity, box)


@pytest.mark.parametrize("text, spec, expected", [
    # code fence + wrapper + key spelling variants (case, spaces, underscores, hyphens)
    ('```json\n{"MOAKS_scores": {"PATELLA_medial-bml": {"size_of_BML (including cyst)": 2, '
     '"number of bml within SUBREGION": 1, "%-of lesion that is BML (excluding cyst)": 0}}}\n```', BML, [2, 1, 0]),
    # prose around, Python-literal quoting, grades as strings
    ("Sure. Here it is: {'patella medial BML': {'Size of BML (including cyst)': '3', "
     "'Number of BML within subregion': ' 2 ', '% of lesion that is BML (excluding cyst)': 1}} Hope it helps",
     BML, [3, 2, 1]),
    # flat object of field keys, no finding level; one field absent
    ('{"Size of BML (including cyst)": 1, "% of lesion that is BML (excluding cyst)": 2}', BML, [1, None, 2]),
    # "Final diagnosis" as a JSON wrapper, MOAKS_grade wrapper with a bare number
    ('{"Final diagnosis": {"patella superior osteophyte": {"grade": 2}}}', OSTEO, [2]),
    ('{"MOAKS_grade": 3}', OSTEO, [3]),
    # a bare number under the finding key fills a single-field question (null schema key -> "grade")
    ('{"medial meniscus anterior extrusion": 1}', EXTRUSION, [1]),
    ('{"medial meniscus anterior extrusion": "2"}', EXTRUSION, [2]),
    # several objects: the last one naming the question counts
    ('{"grade": 1} then I changed my mind: {"grade": 3} {"unrelated": 0}', OSTEO, [3]),
    ('Final diagnosis: {"patella superior osteophyte": {"grade": 1}}\nCorrection: {"grade": 2}', OSTEO, [2]),
    # integral floats are integers; trailing commas are read through the Python-literal path
    ('{"grade": 2.0}', OSTEO, [2]),
    ('{"grade": 2,}', OSTEO, [2]),
    ('{"morphology": 8}', MORPH, [8]),
])
def test_zero_shot_severity(text: str, spec, expected: list) -> None:
    p = parse_output(text, spec)
    assert sev(p) == expected and p.severity_found and p.invalid_grades == 0


@pytest.mark.parametrize("value", ["4", 4, -1, 2.5, "2.5", True, None, [1], "grade 2", "9" * 5000])
def test_invalid_grades_count_as_missing(value) -> None:
    p = parse_output(json.dumps({"patella superior osteophyte": {"grade": value}}), OSTEO)
    assert p.severity == {"grade": None} and p.severity_found and p.invalid_grades == 1


def test_bare_number_does_not_fill_a_multi_field_question() -> None:
    p = parse_output('{"patella medial BML": 2}', BML)
    assert sev(p) == [None, None, None] and not p.severity_found


def test_other_questions_fields_are_not_taken() -> None:
    # A cartilage answer has no BML field names: nothing is located for the BML question.
    p = parse_output('{"patella medial cartilage lesion": {"Size of lesion": 2, "Depth of lesion": 1}}', BML)
    assert not p.severity_found


@pytest.mark.parametrize("text, box, repaired", [
    (f"Location: {BOX_START}[3, 9, 10, 20, 0, 4]{BOX_END}", [3, 9, 10, 20, 0, 4], False),
    (f"{BOX_START} [ 9, 3, 10, 20, 4, 0 ] {BOX_END}", [3, 9, 10, 20, 0, 4], True),  # reversed bounds
    (f"{BOX_START}[1.4, 2.6, 3, 4, 5, 6]{BOX_END}", [1, 3, 3, 4, 5, 6], False),  # floats rounded
    ('{"bbox": [1, 2, 3, 4, 5, 6], "grade": 1}', [1, 2, 3, 4, 5, 6], False),
    ('{"answer": {"Bounding_Box_3D": [[6, 5, 4, 3, 2, 1], [0, 0, 0, 0, 0, 0]]}}', [5, 6, 3, 4, 1, 2], True),
    ('{"box": ["1", "2", "3", "4", "5", "6"]}', [1, 2, 3, 4, 5, 6], False),
    ("The lesion spans [2, 4, 6, 8, 10, 12] and also [0, 0, 0, 0, 0, 0].", [2, 4, 6, 8, 10, 12], False),
    # tokens win over a JSON box, a JSON box wins over a bare list
    (f'[9, 9, 9, 9, 9, 9] {{"box": [1, 1, 1, 1, 1, 1]}} {BOX_START}[2, 2, 2, 2, 2, 2]{BOX_END}', [2, 2, 2, 2, 2, 2],
     False),
    ('[9, 9, 9, 9, 9, 9] {"box": [1, 1, 1, 1, 1, 1]}', [1, 1, 1, 1, 1, 1], False),
])
def test_boxes(text: str, box: list[int], repaired: bool) -> None:
    p = parse_output(text, OSTEO)
    assert p.box == box and p.box_repaired is repaired


@pytest.mark.parametrize("text", [
    "no box here", "[1, 2, 3, 4, 5]", '{"box": [1, 2, 3, 4, 5, true]}', '{"box": [1e400, 1, 2, 3, 4, 5]}',
    "[1, 2, 3, 4, 5, 99999999999]",  # beyond any volume
    f"{BOX_START}[1, 2, 3]{BOX_END}",
])
def test_no_box(text: str) -> None:
    p = parse_output(text, OSTEO)
    assert p.box is None and not p.coord_token_box


def test_undecoded_coordinate_tokens_are_no_box() -> None:
    tokens = "".join(f"<|coord_{k}|>" for k in (1, 5, 2, 9, 3, 7))
    p = parse_output(f"Location: {BOX_START}{tokens}{BOX_END}\n[1, 2, 3, 4, 5, 6]", OSTEO)
    assert p.box is None and p.coord_token_box


@pytest.mark.parametrize("text", [None, 17, "", "   ", "{", "}{", '{"grade": }', "[[[[" * 2000, "{" * 5000,
                                  '{"a": ' * 3000, "\x00\ud800", "nan", "Final diagnosis:", "Final diagnosis: {"])
def test_nothing_parseable(text) -> None:
    p = parse_output(text, OSTEO)
    assert p.severity == {"grade": None} and p.box is None and not p.severity_found


def test_only_the_tail_is_read() -> None:
    p = parse_output('{"grade": 3}' + " " * MAX_CHARS, OSTEO)
    assert not p.severity_found


def test_parse_outputs_matches_single_calls_and_checks_lengths() -> None:
    texts = ['{"grade": 1} [5, 1, 2, 3, 4, 5]', None, f"{BOX_START}[0, 1, 2, 3, 4, 5]{BOX_END}"]
    assert parse_outputs(texts, [OSTEO] * 3) == [parse_output(t, OSTEO) for t in texts]
    with pytest.raises(ValueError, match="one spec per text"):
        parse_outputs(texts, [OSTEO])


# --- never raises ------------------------------------------------------------------------------------

_FRAGMENTS = st.sampled_from([
    "{", "}", "[", "]", ",", ":", '"', "'", "\\", " ", "\n", "```json", "Final diagnosis:", "Location:",
    BOX_START, BOX_END, "<|coord_7|>", '"grade"', "'grade'", '"box"', "MOAKS_scores", '"patella medial BML"',
    '"Size of BML (including cyst)"', "1", "-2", "3.5", "1e999", "9" * 40, "true", "null", "None", "NaN",
])
_TEXTS = st.one_of(st.text(max_size=300), st.lists(_FRAGMENTS, max_size=60).map("".join),
                   st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                                lambda c: st.lists(c, max_size=4) | st.dictionaries(
                                    st.sampled_from(["grade", "box", "MOAKS_grade", "patella medial BML",
                                                     "Number of BML within subregion", "x"]), c, max_size=4),
                                max_leaves=12).map(lambda o: json.dumps(o)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_TEXTS, qid=st.sampled_from(sorted(load_schema())))
def test_never_raises_and_answers_are_well_formed(text: str, qid: int) -> None:
    spec = load_schema()[qid]
    p = parse_output(text, spec)
    assert list(p.severity) == list(spec.field_keys)
    for f in spec.fields:
        assert p.severity[f.key] is None or p.severity[f.key] in f.grades
    if p.box is not None:
        assert len(p.box) == 6 and all(type(v) is int for v in p.box)
        assert p.box[0] <= p.box[1] and p.box[2] <= p.box[3] and p.box[4] <= p.box[5]
