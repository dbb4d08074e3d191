"""Rewrite a release into the other forms the real 3DReasonKnee release may come in, to check the loader on them.

    python scripts/make_release_variants.py SRC OUT

writes three copies of the release at SRC (for example one from ``reasonknee3d synth``) under OUT:

- ``upstream_questions/``: ``data/question_files/`` holds only ``questions_nobbox_guided.json`` and
  ``questions_nobbox_zeroshot.json`` (the package's own wording in the upstream file names and format; no
  subregion mapping, so boxes come from the items);
- ``foreign_paths/`` + ``foreign_images/``: split CSVs without the ``path`` column, ``image_filepath`` /
  ``label_filepath`` written as absolute paths of another machine, ``knee_side`` as ``L`` / ``RIGHT`` /
  ``Left``; the volumes and masks live outside the release, flat in ``foreign_images/`` (load it with
  ``images=OUT/foreign_images``); items name their image by that foreign path too;
- ``answer_only/``: no ``question_id`` or ``box`` keys, ``final_diagnosis`` as a JSON string holding the
  wrapped object (even items) or absent (odd items, the diagnosis only in the answer's ``Final diagnosis:``
  line), the box only in the answer text (written with and without box tokens or the ``Location:`` label),
  no masks, no ``label_filepath``, no ``question_subregion_mapping.json``.

Every copy loads with the same sample ids, boxes and grades as SRC (``tests/data/test_release_forms.py``).
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
from pathlib import Path

from reasonknee3d.constants import BOX_END, BOX_START, LOCATION_PREFIX
from reasonknee3d.prompts import question_prompt
from reasonknee3d.schema import get_question, load_schema

FOREIGN_ROOT = "/mnt/other-machine/3DReasonKnee"
"""Absolute prefix written into the foreign-path copy (a folder that exists nowhere here)."""
VARIANTS = ("upstream_questions", "foreign_paths", "answer_only")


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _generate_files(root: Path) -> list[Path]:
    return sorted((root / "data" / "generate_data").glob("*.json"))


def _csv_files(root: Path) -> list[Path]:
    return sorted((root / "data" / "split_files").glob("*_split.csv"))


def _rewrite_csv(path: Path, rewrite_row, drop: tuple[str, ...] = ()) -> None:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = [f for f in reader.fieldnames or [] if f not in drop]
        rows = [rewrite_row(i, row) for i, row in enumerate(reader)]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def upstream_questions(src: Path, dst: Path) -> Path:
    """Copy with only the two upstream-named question files, ids "1".."69" as in the upstream repository."""
    shutil.copytree(src, dst)
    qf = dst / "data" / "question_files"
    for f in qf.iterdir():
        f.unlink()
    ids = sorted(load_schema())
    _dump(qf / "questions_nobbox_guided.json", {str(q): question_prompt(get_question(q), "guided") for q in ids})
    _dump(qf / "questions_nobbox_zeroshot.json", {str(q): question_prompt(get_question(q), "plain") for q in ids})
    return dst


def foreign_paths(src: Path, dst: Path, images: Path) -> Path:
    """Copy whose CSVs and items hold another machine's absolute paths; the files sit flat in ``images``."""
    shutil.copytree(src, dst)
    images.mkdir(parents=True)
    sides = {"left": ("L", "LEFT", "Left"), "right": ("R", "RIGHT", "Right")}

    def row(i: int, r: dict) -> dict:
        for col in ("image_filepath", "label_filepath"):
            local = dst / r[col]
            shutil.move(local, images / local.name)
            r[col] = f"{FOREIGN_ROOT}/{r[col]}"
        r["knee_side"] = sides[r["knee_side"]][i % 3]
        return r
    for path in _csv_files(dst):
        _rewrite_csv(path, row, drop=("path",))
    for path in _generate_files(dst):
        _dump(path, [{**it, "image": f"{FOREIGN_ROOT}/{it['image']}"} for it in _load(path)])
    shutil.rmtree(dst / "images")
    shutil.rmtree(dst / "masks")
    return dst


_LOCATION_RE = re.compile(rf"^{re.escape(LOCATION_PREFIX)} {re.escape(BOX_START)}(\[[^\]]*\]){re.escape(BOX_END)}$",
                          re.MULTILINE)


def _answer_box_form(answer: str, k: int) -> str:
    """The answer with its Location line written in form ``k % 3``: label + tokens (as is), label only, tokens only."""
    if k % 3 == 1:
        return _LOCATION_RE.sub(lambda m: f"{LOCATION_PREFIX} {m.group(1)}", answer)
    if k % 3 == 2:
        return _LOCATION_RE.sub(lambda m: f"{BOX_START}{m.group(1)}{BOX_END}", answer)
    return answer


def answer_only(src: Path, dst: Path) -> Path:
    """Copy whose items carry no question id, no box and the diagnosis as a JSON string or not at all; no masks
    and no subregion mapping."""
    shutil.copytree(src, dst)
    for path in _generate_files(dst):
        items = []
        for k, it in enumerate(_load(path)):
            it = {key: v for key, v in it.items() if key not in ("question_id", "box")}
            if k % 2 == 0:
                it["final_diagnosis"] = json.dumps({"MOAKS_scores": it["final_diagnosis"]})
            else:
                del it["final_diagnosis"]
            it["answer"] = _answer_box_form(it["answer"], k)
            items.append(it)
        _dump(path, items)
    for path in _csv_files(dst):
        _rewrite_csv(path, lambda i, r: {**r, "label_filepath": ""})
    shutil.rmtree(dst / "masks")
    (dst / "data" / "question_files" / "question_subregion_mapping.json").unlink()
    return dst


def make_variants(src: str | Path, out: str | Path) -> dict[str, Path]:
    """All three copies under ``out`` (which must not exist yet); returns variant name -> release root, plus
    ``foreign_images`` -> the folder to pass as ``images`` for ``foreign_paths``."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder for the rewritten copies")
    out.mkdir(parents=True)
    return {"upstream_questions": upstream_questions(src, out / "upstream_questions"),
            "foreign_paths": foreign_paths(src, out / "foreign_paths", out / "foreign_images"),
            "foreign_images": out / "foreign_images",
            "answer_only": answer_only(src, out / "answer_only")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="release root to rewrite")
    p.add_argument("out", type=Path, help="new folder for the three copies")
    a = p.parse_args()
    for name, path in make_variants(a.src, a.out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
