"""The release's other forms: rewritten copies of a synthetic release load the same, bad forms fail clearly, and
``check-release`` reports forms and exits by whether every split has usable items."""
from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from reasonknee3d import cli
from reasonknee3d.boxes import RELEASE_BOX_AXES, package_box_to_release, release_box_to_package
from reasonknee3d.data import release_forms as rf
from reasonknee3d.data.check_release import check_release
from reasonknee3d.data.release import ReleaseError, ReleaseLoader, iter_samples
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.prompts import question_prompt, release_question_text
from reasonknee3d.schema import get_question

SCRIPT = Path(__file__).parents[2] / "scripts" / "make_release_variants.py"
_spec = importlib.util.spec_from_file_location("make_release_variants", SCRIPT)
variants_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(variants_mod)

SPLITS = ("train", "val", "test", "test_balanced")
QUESTIONS = (1, 5, 30, 42, 60)


def _key(samples):
    return [(s.sample_id, s.box, s.severity) for s in samples]


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("forms")
    src = root / "synth"
    write_synthetic_release(src, 5, (16, 32, 32), seed=3, questions=QUESTIONS)
    out = variants_mod.make_variants(src, root / "variants")
    return {"original": src, **out}


@pytest.fixture
def copy_of(variants, tmp_path):
    """``copy_of(name)`` -> a private copy of one release (tests that edit files use it)."""
    def make(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(variants[name], dst)
        return dst
    return make


def _expected(variants):
    loader = ReleaseLoader(variants["original"])
    return {split: list(loader.iter_samples(split)) for split in SPLITS}


@pytest.mark.parametrize("name", ["upstream_questions", "foreign_paths", "answer_only"])
def test_rewritten_copies_load_the_same_samples(variants, name):
    expected = _expected(variants)
    images = variants["foreign_images"] if name == "foreign_paths" else None
    loader = ReleaseLoader(variants[name], images=images)
    for split in SPLITS:
        skipped = []
        got = list(loader.iter_samples(split, skipped))
        assert skipped == []
        assert _key(got) == _key(expected[split]) and len(got) > 0
        # Answers are rebuilt in the package's format whatever the copy wrote.
        assert [s.answer for s in got] == [s.answer for s in expected[split]]
    forms = loader.forms["test"]
    if name == "answer_only":
        n = len(expected["test"])
        assert forms["box"] == {rf.FORM_BOX_ANSWER: n}
        assert forms["question id"] == {rf.FORM_QID_FINDING: n}
        assert forms["diagnosis"] == {rf.FORM_DIAG_STRING: (n + 1) // 2, rf.FORM_DIAG_ANSWER: n // 2}
    else:
        assert set(forms["box"]) == {"item key 'box'"} and set(forms["diagnosis"]) == {rf.FORM_DIAG_OBJECT}
    if name == "foreign_paths":
        records = loader.volumes("val")
        assert {v.image_form for v in records} == {rf.FORM_PATH_BY_NAME} == {v.mask_form for v in records}
        assert all(v.image_path.parent == variants["foreign_images"] for v in records)
        assert {v.knee_side for v in records} <= {"left", "right"}


def test_question_texts_from_upstream_and_package_files(variants, copy_of):
    up = ReleaseLoader(variants["upstream_questions"])
    assert set(up.question_files()) == {"guided", "plain"}
    guided, plain = up.question_texts("guided"), up.question_texts("plain")
    assert sorted(guided) == list(range(1, 70)) == sorted(plain)
    assert guided[30] == question_prompt(get_question(30), "guided")
    assert plain[30] == question_prompt(get_question(30), "plain")
    # The synthetic release writes the upstream-named files too (release-format text), and they come first.
    own = ReleaseLoader(variants["original"])
    assert own.question_texts("plain") == {q: release_question_text(get_question(q), "plain") for q in QUESTIONS}
    assert own.question_texts("guided") == {q: release_question_text(get_question(q), "guided") for q in QUESTIONS}
    package_only = copy_of("original")
    for name in ("questions_nobbox_guided.json", "questions_nobbox_zeroshot.json"):
        (package_only / "data" / "question_files" / name).unlink()
    package_only = ReleaseLoader(package_only)
    assert package_only.question_texts("plain") == {q: question_prompt(get_question(q)) for q in QUESTIONS}
    with pytest.raises(ReleaseError, match=r"no guided question texts; expected one of \['questions_nobbox_guided"):
        package_only.question_texts("guided")
    with pytest.raises(ReleaseError, match="unknown question text style 'fancy'"):
        own.question_texts("fancy")


def test_bad_question_file_names_file_and_key(copy_of):
    root = copy_of("upstream_questions")
    (root / "data/question_files/questions_nobbox_guided.json").write_text(json.dumps({"1": "q", "two": "q"}))
    with pytest.raises(ReleaseError, match=r"questions_nobbox_guided\.json: entry 'two': expected an integer"):
        ReleaseLoader(root).question_texts("guided")


def test_foreign_paths_without_images_are_refused_naming_row_and_path(variants):
    with pytest.raises(ReleaseError, match=r"val_split\.csv line 2 image_filepath: '/mnt/other-machine/.*_left\.nii\.gz' "
                                           r"resolves to .* outside the release root .*pass the folder"):
        ReleaseLoader(variants["foreign_paths"]).volumes("val")
    skipped = []
    assert list(iter_samples(variants["foreign_paths"], "val", skipped)) == []
    assert skipped and {s.kind for s in skipped} == {rf.KIND_PATH_REFUSED}


def _rewrite_csv(path: Path, edit) -> None:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    fields = list(rows[0])
    for i, row in enumerate(rows):
        edit(i, row)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def test_dotdot_path_refused_unless_found_under_images(copy_of, tmp_path):
    root = copy_of("original")
    outside = tmp_path / "outside"
    outside.mkdir()
    csv_file = root / "data/split_files/val_split.csv"

    def edit(i, row):
        if i == 0:
            moved = outside / Path(row["image_filepath"]).name
            shutil.move(root / row["image_filepath"], moved)
            row["image_filepath"] = f"../outside/{moved.name}"
    _rewrite_csv(csv_file, edit)
    with pytest.raises(ReleaseError, match=r"val_split\.csv line 2 image_filepath: '\.\./outside/.*' resolves to "
                                           r".*outside the release root"):
        ReleaseLoader(root).volumes("val")
    # Inside the images folder, the same path is accepted.
    records = ReleaseLoader(root, images=outside).volumes("val")
    assert records[0].image_form == rf.FORM_PATH_IN_IMAGES and records[0].image_path.parent == outside
    # A file of that name elsewhere under images is found by name when the written path leads nowhere.
    (outside / "sub").mkdir()
    shutil.move(records[0].image_path, outside / "sub" / records[0].image_path.name)
    records = ReleaseLoader(root, images=outside).volumes("val")
    assert records[0].image_form == rf.FORM_PATH_BY_NAME and records[0].image_path.parent == outside / "sub"


def test_ambiguous_file_name_under_images_names_both(variants, tmp_path):
    images = tmp_path / "imgs"
    shutil.copytree(variants["foreign_images"], images / "a")
    shutil.copytree(variants["foreign_images"], images / "b")
    with pytest.raises(ReleaseError, match=r"file name '.*\.nii\.gz' is ambiguous under .*imgs: .*/[ab]/.* and "
                                           r".*/[ab]/"):
        ReleaseLoader(variants["foreign_paths"], images=images).volumes("val")


@pytest.mark.parametrize("value, message", [
    ("up", r"val_split\.csv line 2: knee_side 'up'; expected left or right \(any case\) or L or R"),
    ("OTHER", r"line 2: knee_side 'OTHER'"),
])
def test_bad_knee_side_names_file_row_and_value(copy_of, value, message):
    root = copy_of("original")
    _rewrite_csv(root / "data/split_files/val_split.csv", lambda i, r: r.update(knee_side=value) if i == 0 else None)
    with pytest.raises(ReleaseError, match=message):
        ReleaseLoader(root).volumes("val")


def test_knee_side_contradicting_file_name_names_both(copy_of):
    root = copy_of("original")
    csv_file = root / "data/split_files/val_split.csv"
    row = next(csv.DictReader(open(csv_file)))
    named = rf.side_of_file_name(row["image_filepath"])
    other = {"left": "R", "right": "L"}[named]
    _rewrite_csv(csv_file, lambda i, r: r.update(knee_side=other) if i == 0 else None)
    with pytest.raises(ReleaseError, match=rf"line 2: knee_side '{other}' \(\w+\) contradicts the image file name "
                                           rf"'.*_{named}\.nii\.gz' \({named}\)"):
        ReleaseLoader(root).volumes("val")
    # Batch mode: that volume's items are skipped with the reason, the others load.
    skipped = []
    samples = list(iter_samples(root, "val", skipped))
    assert skipped and all(s.kind == rf.KIND_CSV_ROW and "contradicts" in s.reason for s in skipped)
    assert samples and row["image_filepath"].split("/")[-1] not in {s.image_path.name for s in samples}


def test_upper_case_and_letter_sides_normalize(copy_of):
    root = copy_of("original")
    _rewrite_csv(root / "data/split_files/val_split.csv",
                 lambda i, r: r.update(knee_side=(r["knee_side"].upper(), r["knee_side"][0].upper())[i % 2]))
    records = ReleaseLoader(root).volumes("val")
    assert {v.knee_side for v in records} <= {"left", "right"}
    assert [v.side_form for v in records] == [rf.FORM_SIDE_OTHER_CASE, rf.FORM_SIDE_LETTER][:len(records)]


def _edit_items(root: Path, split: str, edit) -> None:
    path = root / "data/generate_data" / f"{split}.json"
    items = json.loads(path.read_text())
    edit(items)
    path.write_text(json.dumps(items))


@pytest.mark.parametrize("key, value, message", [
    ("box", [1.0, 2, 3, 4, 5, 6], r"item 0 .*'box': \[1\.0, 2, 3, 4, 5, 6\] has non-integer values \[1\.0\]"),
    ("bbox", [True, 2, 3, 4, 5, 6], r"item 0 .*'bbox': .* has non-integer values \[True\]"),
    ("bounding_box", ["1", 2, 3, 4, 5, 6], r"item 0 .*'bounding_box': .* non-integer values \['1'\]"),
    ("box", [1, 2, 3], r"item 0 .*'box': \[1, 2, 3\]: expected a list of six integers"),
])
def test_item_box_must_be_six_integers(copy_of, key, value, message):
    root = copy_of("original")
    _edit_items(root, "test", lambda items: items[0].pop("box") and items[0].update({key: value}))
    with pytest.raises(ReleaseError, match=message):
        list(iter_samples(root, "test"))


def test_bbox_and_bounding_box_keys_are_read(copy_of, variants):
    root = copy_of("original")
    expected = _key(_expected(variants)["test"])

    def rename(items):
        for k, it in enumerate(items):
            it[("box", "bbox", "bounding_box")[k % 3]] = it.pop("box")
    _edit_items(root, "test", rename)
    loader = ReleaseLoader(root)
    assert _key(loader.iter_samples("test")) == expected
    assert set(loader.forms["test"]["box"]) == {"item key 'box'", "item key 'bbox'", "item key 'bounding_box'"}


@pytest.mark.parametrize("answer_box, message", [
    ("Location: [1, 2, 3, 4.5, 5, 6]", r"item 0 .*box \[1, 2, 3, 4\.5, 5, 6\] in the answer has non-integer values"),
    ("Location: [1, 2, 3, 4, 5, 6]\nAlso [1, 2, 3, 4, 5, 7]", r"item 0 .*the answer holds 2 different boxes"),
])
def test_answer_box_errors_name_the_item(copy_of, answer_box, message):
    root = copy_of("answer_only")

    def edit(items):
        lines = items[0]["answer"].splitlines()
        items[0]["answer"] = "\n".join([lines[0], answer_box, *lines[2:]])
    _edit_items(root, "test", edit)
    with pytest.raises(ReleaseError, match=message):
        list(iter_samples(root, "test"))


def test_diagnosis_object_with_wrapper_and_extra_keys(copy_of, variants):
    root = copy_of("original")
    expected = _key(_expected(variants)["test"])

    def edit(items):
        for k, it in enumerate(items):
            diag = it.pop("final_diagnosis")
            box = it.pop("box")
            del it["question_id"]
            if k % 2:
                it["final_diagnosis"] = {"MOAKS_scores": diag, "bbox": box, "note": "reader 2"}
            else:
                it["final_diagnosis"] = str({**diag, "box": box})  # Python-literal quoting in a string
            it["box"] = box
    _edit_items(root, "test", edit)
    assert _key(iter_samples(root, "test")) == expected


def test_empty_diagnosis_without_json_in_answer_is_an_error(copy_of):
    root = copy_of("answer_only")

    def edit(items):
        items[1]["final_diagnosis"] = ""
        items[1]["answer"] = items[1]["answer"].split("Final diagnosis:")[0]
    _edit_items(root, "test", edit)
    with pytest.raises(ReleaseError, match=r"item 1 .*no final_diagnosis and no diagnosis JSON in the answer"):
        list(iter_samples(root, "test"))
    _edit_items(root, "test", lambda items: items[1].update(final_diagnosis="not json"))
    with pytest.raises(ReleaseError, match=r"item 1 .*final_diagnosis is a string that holds no JSON object"):
        list(iter_samples(root, "test"))


def test_no_box_anywhere_and_no_mapping_loads_without_box(copy_of):
    root = copy_of("answer_only")

    def edit(items):
        items[0]["answer"] = "\n".join(line for line in items[0]["answer"].splitlines() if "[" not in line)
    _edit_items(root, "test", edit)
    loader = ReleaseLoader(root)
    first = next(loader.iter_samples("test"))
    assert first.box is None and first.box_source == rf.FORM_BOX_NONE_SOURCE and "Location:" not in first.answer


def test_box_from_mask_needs_the_mask(copy_of, variants):
    root = copy_of("original")
    def edit(items):
        for it in items:
            del it["box"]
            it["answer"] = "\n".join(line for line in it["answer"].splitlines() if not line.startswith("Location:"))
    _edit_items(root, "val", edit)
    loader = ReleaseLoader(root)
    with_masks = list(loader.iter_samples("val"))
    assert _key(with_masks) == _key(_expected(variants)["val"])
    assert set(loader.forms["val"]["box"]) <= {rf.FORM_BOX_MASK, rf.FORM_BOX_NONE_REGION}
    assert loader.forms["val"]["box"][rf.FORM_BOX_MASK] > 0
    for mask in (root / "masks").iterdir():
        mask.unlink()
    skipped = []
    assert list(iter_samples(root, "val", skipped)) == []
    assert skipped and {s.kind for s in skipped} == {rf.KIND_MASK_MISSING}
    assert "knee_" in skipped[0].reason and "file not found" in skipped[0].reason


def test_train_balanced_uses_train_csv(copy_of, variants):
    root = copy_of("original")
    shutil.copy(root / "data/generate_data/train.json", root / "data/generate_data/train_balanced.json")
    got = list(iter_samples(root, "train_balanced"))
    assert _key(got) == _key(iter_samples(root, "train")) and {s.split for s in got} == {"train_balanced"}


def test_release_box_axes_both_ways():
    written = [10, 20, 30, 40, 50, 60]  # [start_slice, end_slice, x_min, x_max, y_min, y_max]
    assert RELEASE_BOX_AXES == (0, 1, 2)
    assert release_box_to_package(written) == [10, 20, 30, 40, 50, 60]
    assert package_box_to_release([10, 20, 30, 40, 50, 60]) == written
    # x on the columns (axis 2), y on the rows (axis 1): the pairs trade places, both ways.
    assert release_box_to_package(written, (0, 2, 1)) == [10, 20, 50, 60, 30, 40]
    assert package_box_to_release([10, 20, 50, 60, 30, 40], (0, 2, 1)) == written
    # A rotation of the axes checks that the two directions are inverse, not the same map.
    assert release_box_to_package(written, (1, 2, 0)) == [50, 60, 10, 20, 30, 40]
    assert package_box_to_release([50, 60, 10, 20, 30, 40], (1, 2, 0)) == written
    with pytest.raises(ValueError, match=r"box axes \(0, 0, 1\)"):
        release_box_to_package(written, (0, 0, 1))


# --- check-release ------------------------------------------------------------------------------------

def test_check_release_reports_the_forms(variants):
    expected = _expected(variants)
    report = check_release(variants["answer_only"])
    assert report["ok"] and report["blocking"] == [] and not report["subregion_mapping"]
    for split in SPLITS:
        r = report["splits"][split]
        assert r["usable"] == r["items"] == len(expected[split]) and r["skipped"] == {}
        assert r["forms"]["box"] == {rf.FORM_BOX_ANSWER: len(expected[split])}
        assert r["forms"]["mask path"] == {"none in the CSV": r["csv_rows"]}
        assert r["question_ids"]["covered"] == len({s.question_id for s in expected[split]})
    report = check_release(variants["foreign_paths"], images=variants["foreign_images"])
    vol = report["splits"]["val"]["volumes"]
    assert vol["found"] == vol["rows"] > 0 and vol["masks"]["affine_agrees"] == vol["masks"]["found"] == vol["rows"]
    assert report["splits"]["val"]["csv_path_column"] is False
    assert set(report["splits"]["val"]["forms"]["knee side"]) <= {rf.FORM_SIDE_LETTER, rf.FORM_SIDE_OTHER_CASE}
    # Written boxes agree with the masks as written, not with x and y swapped.
    axes = check_release(variants["original"])["splits"]["val"]["box_axes"]
    assert axes["as_written"]["mean_iou"] == 1.0 and axes["as_written"]["exact"] == axes["boxes"] > 0
    assert axes["x_y_swapped"]["mean_iou"] < 1.0


def test_check_release_cli_exit_codes_and_json(variants, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert cli.main(["check-release", str(variants["original"]), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and set(report["splits"]) == set(SPLITS)
    assert "ok: every split present has usable items" in capsys.readouterr().out
    # Foreign paths without --images: nothing usable, exit 1 naming the split and the reason.
    out2 = tmp_path / "check2.json"
    assert cli.main(["check-release", str(variants["foreign_paths"]), "--json", str(out2)]) == 1
    report = json.loads(out2.read_text())
    assert not report["ok"] and len(report["blocking"]) == len(SPLITS)
    assert report["blocking"][0].startswith("train: no usable item of ")
    assert rf.KIND_PATH_REFUSED in report["blocking"][0]
    assert report["splits"]["train"]["csv_row_problems"][rf.KIND_PATH_REFUSED]["count"] >= 1
    assert cli.main(["check-release", str(variants["foreign_paths"]), "--images",
                     str(variants["foreign_images"])]) == 0
    assert cli.main(["check-release", str(tmp_path)]) == 2
    assert "not a release root" in capsys.readouterr().err


def test_export_references_with_images(variants, tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert cli.main(["export-references", "--data", str(variants["original"]), "--split", "val", "--out", str(a)]) == 0
    assert cli.main(["export-references", "--data", str(variants["foreign_paths"]), "--split", "val", "--out", str(b),
                     "--images", str(variants["foreign_images"])]) == 0
    assert a.read_text() == b.read_text() and a.read_text()
