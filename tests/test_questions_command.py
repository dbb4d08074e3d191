"""`reasonknee3d questions`: the 69 question types as a table (under 100 columns) and as JSON."""
from __future__ import annotations

import json
import re

from reasonknee3d import cli
from reasonknee3d.schema import grade_range, load_schema


def test_json_lists_every_question_with_its_fields_and_grades(capsys):
    assert cli.main(["questions", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    schema = load_schema()
    assert [r["question_id"] for r in rows] == sorted(schema) and len(rows) == 69
    for r in rows:
        spec = schema[r["question_id"]]
        assert (r["category"], r["finding_key"], r["structure"]) == (spec.category, spec.finding_key, spec.structure)
        assert [(f["key"], tuple(f["grades"])) for f in r["fields"]] == [(f.key, f.grades) for f in spec.fields]


def test_category_filter(capsys):
    assert cli.main(["questions", "--json", "--category", "meniscal_extrusion"]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = [q.question_id for q in load_schema().values() if q.category == "meniscal_extrusion"]
    assert [r["question_id"] for r in rows] == expected and expected
    assert cli.main(["questions", "--category", "knee"]) == 2
    assert capsys.readouterr().err.startswith("reasonknee3d questions: error: argument --category: invalid choice")


def test_table_has_a_row_per_question_and_fits_100_columns(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal still gets the table at most TABLE_WIDTH wide
    assert cli.main(["questions"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= cli.TABLE_WIDTH < 100
    ids = [int(m.group(1)) for line in lines if (m := re.match(r"^│\s*(\d+) │", line))]
    assert ids == sorted(load_schema())
    text = "\n".join(lines)
    assert "patella medial BML" in text and "Size of BML (including cyst): 0-3" in text


def test_grade_range():
    assert grade_range((0, 1, 2, 3)) == "0-3" and grade_range((0, 1)) == "0-1"
    assert grade_range((0, 2, 3)) == "0,2,3" and grade_range((4,)) == "4"
