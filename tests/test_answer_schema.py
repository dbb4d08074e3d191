"""Schema loading and the answer format."""
import json

import pytest

from reasonknee3d.answer import check_severity, format_answer
from reasonknee3d.schema import get_question, load_schema


def test_schema_has_69_questions_and_null_keys_become_grade():
    schema = load_schema()
    assert sorted(schema) == list(range(1, 70))
    assert schema[44].field_keys == ("grade",) and schema[45].field_keys == ("grade",)
    assert schema[54].field("tear_location").grades == (0, 1, 2, 3)
    with pytest.raises(KeyError, match="unknown question id 70"):
        get_question(70)


def test_format_answer_layout():
    spec = get_question(16)
    text = format_answer(spec, ["Look at the patella.", "  "], [1, 2, 3, 4, 5, 6],
                         {"Size of lesion": 1, "Depth of lesion": 2})
    lines = text.split("\n")
    assert lines[0] == "Look at the patella."
    assert lines[1] == "Location: <|box_start|>[1, 2, 3, 4, 5, 6]<|box_end|>"  # after the first step (answer.py)
    assert lines[2].startswith("Final diagnosis: ")
    assert json.loads(lines[2][len("Final diagnosis: "):]) == {
        "patella medial cartilage lesion": {"Size of lesion": 1, "Depth of lesion": 2}}


@pytest.mark.parametrize("sev,msg", [
    ({"Size of lesion": 1}, "missing fields"),
    ({"Size of lesion": 1, "Depth of lesion": 4}, "expected an integer in"),
    ({"Size of lesion": 1, "Depth of lesion": "2"}, "expected an integer in"),
    ({"Size of lesion": 1, "Depth of lesion": 2, "x": 0}, "unknown fields"),
])
def test_check_severity_errors(sev, msg):
    with pytest.raises(ValueError, match=msg):
        check_severity(get_question(16), sev, where="item 3")
