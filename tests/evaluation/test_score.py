"""The scorer end to end: input checks with line numbers, hand-computed reports, majority source, reruns."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from reasonknee3d.answer import format_answer
from reasonknee3d.cli import main
from reasonknee3d.constants import BENCH_VERSION
from reasonknee3d.evaluation.score import (ScoreInputError, read_predictions, read_references, score_files,
                                           score_predictions)
from reasonknee3d.schema import get_question, load_schema


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def make_references(n: int, seed: int = 0) -> list[dict]:
    """References drawn from the schema: random question, grades and box (no box for ids >= 60)."""
    rng = random.Random(seed)
    qids = sorted(load_schema())
    rows = []
    for i in range(n):
        q = get_question(rng.choice(qids))
        lo = [rng.randrange(0, 20) for _ in range(3)]
        box = None if q.question_id >= 60 else [lo[0], lo[0] + 5, lo[1], lo[1] + 7, lo[2], lo[2] + 3]
        rows.append({"sample_id": f"s{i}", "volume_id": f"v{i // 10}", "question_id": q.question_id,
                     "severity": {f.key: rng.choice(f.grades) for f in q.fields}, "box": box, "split": "test"})
    return rows


def answer(ref: dict, box=None, **changes) -> str:
    """The package's answer text for a reference, with some grades changed."""
    q = get_question(ref["question_id"])
    return format_answer(q, ["reasoning"], box if box is not None else ref["box"], {**ref["severity"], **changes})


# --- reading -----------------------------------------------------------------------------------------

GOOD = {"sample_id": "a", "volume_id": "v", "question_id": 30, "severity": {"grade": 2}, "box": [0, 1, 0, 1, 0, 1],
        "split": "test"}


@pytest.mark.parametrize("bad, message", [
    ('{"sample_id": "b", "question_id": 30,', "not valid JSON"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ({**GOOD, "sample_id": "a"}, "duplicate sample_id 'a' (first on line 1)"),
    ({**GOOD, "sample_id": "b", "question_id": 70}, "unknown question_id 70"),
    ({**GOOD, "sample_id": "b", "question_id": "30"}, "unknown question_id '30'"),
    ({**GOOD, "sample_id": "b", "severity": {"grade": 4}}, "expected an integer in [0, 1, 2, 3]"),
    ({**GOOD, "sample_id": "b", "severity": {"Grade": 1}}, "missing fields ['grade']"),
    ({**GOOD, "sample_id": "b", "severity": {"grade": [1]}}, "has grade [1]"),
    ({**GOOD, "sample_id": "b", "box": [0, 1, 0, 1, 0]}, "'box' must be null or 6 integers"),
    ({**GOOD, "sample_id": "b", "box": [0, 1, 0, 1.5, 0, 1]}, "'box' must be null or 6 integers"),
    ({**GOOD, "sample_id": "b", "box": [0, 1, 5, 1, 0, 1]}, "invalid box: box [0, 1, 5, 1, 0, 1] has min > max"),
    ({**GOOD, "sample_id": "b", "box": [-1, 1, 0, 1, 0, 1]}, "negative index"),
    ({**GOOD, "sample_id": ""}, "'sample_id' must be a non-empty string"),
])
def test_bad_references_stop_with_file_and_line(tmp_path: Path, bad, message: str) -> None:
    path = write_jsonl(tmp_path / "r.jsonl", [GOOD, "", bad])  # the blank line 2 is skipped, not counted
    with pytest.raises(ScoreInputError) as e:
        read_references(path)
    assert f"{path}:3" in str(e.value) and message in str(e.value)


def test_reference_file_checks(tmp_path: Path) -> None:
    with pytest.raises(ScoreInputError, match="no references"):
        read_references(write_jsonl(tmp_path / "empty.jsonl", []))
    (tmp_path / "bin.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ScoreInputError, match=r"bin.jsonl:2: not UTF-8"):
        read_references(tmp_path / "bin.jsonl")
    refs = read_references(write_jsonl(tmp_path / "ok.jsonl", [GOOD, {**GOOD, "sample_id": "b", "box": None}]))
    assert [(r.sample_id, r.box, r.line) for r in refs] == [("a", [0, 1, 0, 1, 0, 1], 1), ("b", None, 2)]


def test_bad_prediction_lines_are_reported_and_ignored(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"sample_id": "a", "output": "first"},
        '{"sample_id": "b", "output": ',
        {"sample_id": "a", "output": "second"},
        {"sample_id": "c", "output": {"grade": 1}},
        {"sample_id": 5, "output": "x"},
        {"sample_id": "d"},
        {"sample_id": "e", "output": None, "model": "extra keys are fine"},
    ])
    preds = read_predictions(path)
    assert preds.outputs == {"a": "first", "e": None}
    assert (preds.lines, preds.malformed, preds.duplicates) == (7, 4, 1)
    assert [m.split(": ", 1)[0] for m in preds.issues] == [f"{path}:{k}" for k in (2, 3, 4, 5, 6)]
    assert "duplicate sample_id 'a' (first on line 1)" in preds.issues[1]


# --- scoring -----------------------------------------------------------------------------------------

REFS = [
    {"sample_id": "A", "question_id": 30, "severity": {"grade": 2}, "box": [0, 9, 0, 9, 0, 9]},
    {"sample_id": "B", "question_id": 1, "box": [0, 9, 0, 9, 0, 9],
     "severity": {"Size of BML (including cyst)": 1, "Number of BML within subregion": 0,
                  "% of lesion that is BML (excluding cyst)": 3}},
    {"sample_id": "C", "question_id": 30, "severity": {"grade": 0}, "box": None},
    {"sample_id": "D", "question_id": 30, "severity": {"grade": 0}, "box": [10, 19, 0, 9, 0, 9]},
]


def test_hand_computed_report(tmp_path: Path) -> None:
    refs = write_jsonl(tmp_path / "r.jsonl", REFS)
    preds = write_jsonl(tmp_path / "p.jsonl", [
        {"sample_id": "A", "output": answer(REFS[0], box=[0, 9, 0, 9, 0, 4])},  # exact; IoU 500/1000
        {"sample_id": "B", "output": '```json\n{"MOAKS_scores": {"patella medial BML": {"Size of BML (including '
                                     'cyst)": 1, "Number of BML within subregion": 0, "% of lesion that is BML '
                                     '(excluding cyst)": "2"}}}\n```'},  # 2 of 3 fields right, no box
        {"sample_id": "C", "output": "I cannot tell."},  # nothing parseable
        {"sample_id": "X", "output": "unknown sample"},
        {"sample_id": "A", "output": "a duplicate is ignored"},
        "{broken",
    ])  # D has no line: a missing prediction
    report = score_files(preds, refs, tmp_path / "out", plots=False)

    assert report["bench_version"] == BENCH_VERSION and report["n"] == 4
    o = report["overall"]
    assert o["diag_exact"] == pytest.approx(1 / 4)  # only A
    assert o["diag_field"] == pytest.approx(3 / 6)  # pairs: A1 B3 C1 D1; right: A, B size, B number
    # groups: osteophyte/grade {2: 1/1, 0: 0/2} -> 0.5; BML size {1: 1} -> 1; number {0: 1} -> 1; % {3: 0} -> 0
    assert o["balanced_acc"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)
    assert o["miou"] == pytest.approx(0.5 / 3)  # A 0.5, B none, D missing
    assert o["acc_iou25"] == pytest.approx(1 / 3) and o["acc_iou50"] == pytest.approx(1 / 3)
    assert o["parse_fail_severity"] == pytest.approx(2 / 4)  # C and D
    assert o["parse_fail_box"] == pytest.approx(2 / 3)  # B and D (C has no reference box)
    # qwk over all 6 pairs (every field 0-3); C and D missing -> farthest grade 3.
    # true [2,1,0,3,0,0], pred [2,1,0,2,3,3]: sum w*O = (1+9+9)/(9*6) = 19/54;
    # rows (3,1,1,1)/6, cols (1,1,2,2)/6 -> sum_ij (i-j)^2 r_i c_j = 81+11+7+15 = 114, sum w*E = 114/324;
    # kappa = 1 - (19/54)/(114/324) = 1 - 114/114 = 0: no better than chance
    assert o["qwk"] == pytest.approx(0.0, abs=1e-12)

    # majority from the scored references: osteophyte grade 0 (two 0s, one 2), BML [1, 0, 3];
    # boxes: q30 median of A and D = [5, 14, 0, 9, 0, 9] (IoU with A 500/1500, with D 500/1500), q1 = B's box
    m = report["majority_baseline"]
    assert m["diag_exact"] == pytest.approx(3 / 4) and m["diag_field"] == pytest.approx(5 / 6)
    assert m["miou"] == pytest.approx((1 / 3 + 1 + 1 / 3) / 3)
    assert "themselves" in report["majority_source"]

    c = report["counts"]
    assert (c["unknown_predictions"], c["duplicate_predictions"], c["malformed_prediction_lines"],
            c["missing_predictions"], c["invalid_grades"]) == (1, 1, 1, 1, 0)
    assert report["support"]["diag_field"] == {"n": 6, "parse_failures": 2}  # C and D; B's "2" is just wrong
    assert report["by_category"]["osteophyte"]["n"] == 3 and report["by_category"]["bone_marrow_lesion"]["n"] == 1
    assert report["by_compartment"]["none"]["n"] == 3
    # osteophyte rows: grade 0 -> C and D missing; grade 2 -> A right
    assert report["confusion"]["osteophyte / grade"]["matrix"] == [[0, 0, 0, 0, 2], [0] * 5, [0, 0, 1, 0, 0], [0] * 5]
    assert any("'X' is not in the references" in m for m in report["input_issues"])

    rows = [json.loads(line) for line in (tmp_path / "out" / "per_sample.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in rows] == ["A", "B", "C", "D"]
    assert rows[0]["exact"] and rows[0]["iou"] == pytest.approx(0.5) and rows[2]["iou"] is None
    assert rows[1]["fields_correct"] == 2 and rows[3]["has_prediction"] is False
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report


def test_majority_source_and_perfect_predictions(tmp_path: Path) -> None:
    refs = make_references(60, seed=1)
    train = make_references(200, seed=2)
    perfect = [{"sample_id": r["sample_id"], "output": answer(r)} for r in refs]
    report = score_files(write_jsonl(tmp_path / "p.jsonl", perfect), write_jsonl(tmp_path / "r.jsonl", refs),
                         tmp_path / "out", majority_source=write_jsonl(tmp_path / "train.jsonl", train), plots=False)
    for metric in ("diag_exact", "diag_field", "balanced_acc", "qwk", "miou", "acc_iou50"):
        assert report["overall"][metric] == pytest.approx(1.0), metric
    assert report["overall"]["parse_fail_severity"] == 0 and report["overall"]["parse_fail_box"] == 0
    assert report["majority_source"].endswith("train.jsonl")
    # the majority answers come from the train file: learnt from the scored references they differ
    own = score_predictions({}, read_references(tmp_path / "r.jsonl"))
    assert own.report["majority_baseline"] != report["majority_baseline"]


def test_rerun_replaces_the_report_cleanly(tmp_path: Path) -> None:
    refs = write_jsonl(tmp_path / "r.jsonl", REFS)
    preds = write_jsonl(tmp_path / "p.jsonl", [{"sample_id": "A", "output": answer(REFS[0])}])
    out = tmp_path / "out"
    score_files(preds, refs, out, plots=True)
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "per_sample.jsonl", "per_category.png",
                                               "iou_histogram.png", "confusion_ordinal.png"}
    write_jsonl(preds, [])
    report = score_files(preds, refs, out, plots=False)
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "per_sample.jsonl"}  # no stale PNGs
    assert json.loads((out / "report.json").read_text())["counts"]["missing_predictions"] == 4 == \
        report["counts"]["missing_predictions"]


def test_cli_score_and_bad_references(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    refs = write_jsonl(tmp_path / "r.jsonl", REFS)
    preds = write_jsonl(tmp_path / "p.jsonl", [{"sample_id": "A", "output": answer(REFS[0])}])
    assert main(["score", "--predictions", str(preds), "--references", str(refs), "--out", str(tmp_path / "o"),
                 "--no-plots"]) == 0
    assert "diag_exact" in capsys.readouterr().out
    write_jsonl(refs, [*REFS, {**REFS[0], "sample_id": "Z", "question_id": 99}])
    assert main(["score", "--predictions", str(preds), "--references", str(refs), "--out", str(tmp_path / "o")]) == 2
    assert f"{refs}:5: unknown question_id 99" in capsys.readouterr().err


def test_score_command_imports_no_torch(tmp_path: Path) -> None:
    # Plots are on: matplotlib is imported by the plotting child process only.
    refs = write_jsonl(tmp_path / "r.jsonl", REFS)
    preds = write_jsonl(tmp_path / "p.jsonl", [{"sample_id": "A", "output": answer(REFS[0])}])
    code = ("import sys; from reasonknee3d.cli import main; "
            f"rc = main(['score', '--predictions', {str(preds)!r}, '--references', {str(refs)!r}, "
            f"'--out', {str(tmp_path / 'o')!r}]); "
            "print(rc, sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
