"""The forms in which a 3DReasonKnee release may write each piece, and one reader per piece that says which form
it met.

``data/release.py`` reads a release through these helpers; ``data/check_release.py`` reports the forms. Each
reader returns what it read plus a short form name (the ``FORM_*`` strings below), or raises ``FormError``
with a message naming the place and the value, and a ``kind`` that batch reports group skips by.

Pieces and accepted forms:

- question files (``data/question_files/``): the package's ``questions.json`` and the upstream
  ``questions_nobbox_guided.json`` / ``questions_nobbox_zeroshot.json``, each ``{"<id>": text}``;
- CSV paths (``image_filepath`` / ``label_filepath``): relative to the release root, absolute inside it, or
  written on another machine and found by file name under an ``images`` folder (``NameIndex``); a path that
  resolves outside the release root and outside that folder is refused;
- ``knee_side``: ``left`` / ``right`` in any case, or ``L`` / ``R``; it must agree with a ``_left`` /
  ``_right`` file name;
- ``final_diagnosis``: an object, a string holding that object as JSON, or absent / empty with the diagnosis
  only in the answer text (the last JSON object there that names a finding counts);
- box: an item key (``BOX_KEYS``), else six integers written in the answer text, else (in ``release.py``)
  the masks and ``question_subregion_mapping.json``. Written boxes are in the release order
  (``boxes.RELEASE_BOX_AXES``) and must be six integers: floats and booleans are refused, not rounded.
"""
from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Mapping, Optional

from ..boxes import release_box_to_package
from ..constants import DIAGNOSIS_PREFIX
from ..parsing import json_objects

# --- form names (what ReleaseLoader.forms counts and check-release prints) -------------------------------

FORM_PATH_RELATIVE = "relative"
FORM_PATH_ABSOLUTE_IN_ROOT = "absolute, in the release"
FORM_PATH_IN_IMAGES = "written path, in images"
FORM_PATH_BY_NAME = "by file name in images"
FORM_PATH_MISSING = "not found"

FORM_SIDE_WORD = "left/right"
FORM_SIDE_OTHER_CASE = "LEFT/RIGHT (other case)"
FORM_SIDE_LETTER = "L/R"

FORM_DIAG_OBJECT = "object"
FORM_DIAG_STRING = "JSON string"
FORM_DIAG_ANSWER = "answer text only"

FORM_BOX_ANSWER = "answer text"
FORM_BOX_MASK = "mask + question_subregion_mapping"
FORM_BOX_NONE_REGION = "none (the question's labels are absent from the mask)"
FORM_BOX_NONE_SOURCE = "none (no box written and no question_subregion_mapping.json)"

FORM_QID_ITEM = "item question_id"
FORM_QID_FINDING = "finding key of the diagnosis"

BOX_KEYS = ("box", "bbox", "bounding_box")
"""Item keys read as the box, in this order (the first present wins)."""

KNEE_SIDES = {"left": "left", "right": "right", "l": "left", "r": "right"}

QUESTION_FILES = {"package": "questions.json", "guided": "questions_nobbox_guided.json",
                  "plain": "questions_nobbox_zeroshot.json"}
"""Question files a release may ship, by the form name check-release reports."""

QUESTION_TEXT_STYLES = {"guided": ("guided",), "plain": ("plain", "package")}
"""Prompt style -> question files that serve it, in order of preference: ``plain`` is the upstream zero-shot
file, else the package's own ``questions.json`` (the plain question wording, ``prompts.question_prompt``)."""

# --- skip kinds (batch reports count skipped items per kind) -------------------------------------------

KIND_CSV_ROW = "bad split CSV row"
KIND_PATH_REFUSED = "path outside the release root"
KIND_IMAGE_MISSING = "image file not found"
KIND_IMAGE_UNREADABLE = "image unreadable"
KIND_MASK_MISSING = "mask file not found"
KIND_MASK_UNUSABLE = "mask unusable"
KIND_NOT_IN_CSV = "image not in the split CSV"
KIND_BAD_ITEM = "malformed item"
KIND_QUESTION = "question not identified"
KIND_DIAGNOSIS = "bad diagnosis"
KIND_BOX = "bad box"
KIND_NO_MASK_FOR_BOX = "no box and no mask to derive it"
KIND_DUPLICATE = "duplicate sample"


class FormError(ValueError):
    """A piece of a release in no accepted form; the message names the place and the value."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


# --- question files --------------------------------------------------------------------------------------

def read_question_file(path: Path) -> dict[int, str]:
    """``{"<question id>": text}`` -> {id: text}; an error names the file and the bad key or value."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormError(f"{path}: cannot read it as JSON ({e})", KIND_BAD_ITEM) from None
    if not isinstance(raw, dict):
        raise FormError(f"{path}: expected a JSON object {{\"<question id>\": text}}, got {type(raw).__name__}",
                        KIND_BAD_ITEM)
    out: dict[int, str] = {}
    for key, text in raw.items():
        if not re.fullmatch(r"\s*\d+\s*", str(key)) or not isinstance(text, str):
            raise FormError(f"{path}: entry {key!r}: expected an integer question id mapped to the question text, "
                            f"got {key!r}: {text!r:.60}", KIND_BAD_ITEM)
        out[int(key)] = text
    return out


# --- paths ----------------------------------------------------------------------------------------------

def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class NameIndex:
    """NIfTI files under one folder by file name, from a single walk made on the first lookup.

    Locates volumes and masks whose written paths come from another machine. The walk does not follow
    symbolic links to folders (a link cycle would never end); link the files, or pass the real folder.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.normpath(Path(root).absolute()))
        if not self.root.is_dir():
            raise FormError(f"images folder {self.root}: not a folder", KIND_PATH_REFUSED)
        self._by_name: Optional[dict[str, list[Path]]] = None

    @property
    def by_name(self) -> dict[str, list[Path]]:
        if self._by_name is None:
            index: dict[str, list[Path]] = {}
            for folder, _, files in os.walk(self.root):
                for name in files:
                    if name.endswith((".nii.gz", ".nii")):
                        index.setdefault(name, []).append(Path(folder) / name)
            self._by_name = index
        return self._by_name

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_name.values())

    def contains(self, path: Path) -> bool:
        return _within(path, self.root)

    def find(self, name: str, where: str) -> Optional[Path]:
        """The one file called ``name`` under the folder, None if there is none; an error if there are several."""
        hits = self.by_name.get(name, [])
        if len(hits) > 1:
            raise FormError(f"{where}: file name {name!r} is ambiguous under {self.root}: {hits[0]} and {hits[1]}"
                            + (f" (and {len(hits) - 2} more)" if len(hits) > 2 else ""), KIND_CSV_ROW)
        return hits[0] if hits else None


def file_name(written: str) -> str:
    """Last component of a path written on any machine (``\\`` separators included)."""
    return PureWindowsPath(written).name if "\\" in written else PurePosixPath(written).name


def resolve_path(written: str, root: Path, images: Optional[NameIndex], where: str) -> tuple[Path, str]:
    """Where a CSV path points on this machine, and its form (``FORM_PATH_*``).

    The written path is used when it lies inside the release root or the images folder and exists; otherwise
    the file is looked up by name under the images folder. A path outside both that is not found by name is
    refused (``../`` tricks, other machines' absolute paths without ``images``). A path inside the root that
    does not exist comes back with ``FORM_PATH_MISSING`` for the caller to report.
    """
    written = written.strip()
    foreign = "\\" in written and PureWindowsPath(written).is_absolute()  # a Windows path: only its name helps
    cand = None if foreign else Path(os.path.normpath(root / written.replace("\\", "/")))
    in_root = cand is not None and _within(cand, root)
    in_images = cand is not None and images is not None and images.contains(cand)
    if (in_root or in_images) and cand.is_file():  # type: ignore[union-attr]
        if not in_root:
            return cand, FORM_PATH_IN_IMAGES  # type: ignore[return-value]
        return cand, FORM_PATH_ABSOLUTE_IN_ROOT if Path(written).is_absolute() else FORM_PATH_RELATIVE  # type: ignore[return-value]
    if images is not None:
        found = images.find(file_name(written), where)
        if found is not None:
            return found, FORM_PATH_BY_NAME
    if not (in_root or in_images):
        hint = (f"and no file named {file_name(written)!r} under the images folder {images.root}" if images is not None
                else "pass the folder holding the files as images=DIR (--images DIR) to find them by file name")
        target = f"resolves to {cand}, outside" if cand is not None else "is an absolute path from another machine, not in"
        raise FormError(f"{where}: {written!r} {target} the release root {root}; not followed: {hint}",
                        KIND_PATH_REFUSED)
    return cand, FORM_PATH_MISSING  # type: ignore[return-value]


# --- knee side ------------------------------------------------------------------------------------------

def side_of_file_name(written: str) -> Optional[str]:
    """``left`` / ``right`` from a ``..._left.nii.gz`` / ``..._right.nii.gz`` name, else None."""
    stem = re.sub(r"\.nii(\.gz)?$", "", file_name(written))
    side = stem.rsplit("_", 1)[-1].lower()
    return side if side in ("left", "right") else None


def read_knee_side(value: Any, image_written: str, where: str) -> tuple[str, str]:
    """``(left|right, form)`` from a CSV ``knee_side``; an error names the value, or both sides when the file
    name says the other knee."""
    text = str(value if value is not None else "").strip()
    side = KNEE_SIDES.get(text.lower())
    if side is None:
        raise FormError(f"{where}: knee_side {text!r}; expected left or right (any case) or L or R", KIND_CSV_ROW)
    named = side_of_file_name(image_written)
    if named is not None and named != side:
        raise FormError(f"{where}: knee_side {text!r} ({side}) contradicts the image file name "
                        f"{file_name(image_written)!r} ({named})", KIND_CSV_ROW)
    form = FORM_SIDE_WORD if text in ("left", "right") else FORM_SIDE_LETTER if len(text) == 1 else FORM_SIDE_OTHER_CASE
    return side, form


# --- diagnosis ------------------------------------------------------------------------------------------

def _objects_of_string(text: str) -> list[dict]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        try:
            obj = ast.literal_eval(text.strip())  # single-quoted (Python) form
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return json_objects(text)
    return [obj] if isinstance(obj, dict) else []


def diagnosis_candidates(item: Mapping[str, Any], where: str) -> tuple[list[dict], str]:
    """Objects that may hold the item's diagnosis, most likely first, and the form (``FORM_DIAG_*``).

    An object is one candidate; a string is parsed (JSON, else Python-literal quoting); absent, null or
    empty means the answer text: its JSON objects from ``Final diagnosis:`` on if that label is present,
    else all of them, last first. The caller picks the first that names a finding.
    """
    value = item.get("final_diagnosis")
    if isinstance(value, dict) and value:
        return [value], FORM_DIAG_OBJECT
    if isinstance(value, str) and value.strip():
        found = _objects_of_string(value)
        if not found:
            raise FormError(f"{where}: final_diagnosis is a string that holds no JSON object: {value!r:.80}",
                            KIND_DIAGNOSIS)
        return found, FORM_DIAG_STRING
    if value not in (None, "", {}):
        raise FormError(f"{where}: final_diagnosis {value!r:.80}: expected an object {{finding: {{field: grade}}}}, "
                        f"a string holding one as JSON, or nothing (diagnosis in the answer)", KIND_DIAGNOSIS)
    answer = item.get("answer") if isinstance(item.get("answer"), str) else ""
    p = answer.rfind(DIAGNOSIS_PREFIX)
    found = json_objects(answer[p:] if p != -1 else answer)
    if not found:
        raise FormError(f"{where}: no final_diagnosis and no diagnosis JSON in the answer", KIND_DIAGNOSIS)
    return found[::-1], FORM_DIAG_ANSWER


# --- boxes ----------------------------------------------------------------------------------------------

def strict_box(value: Any, where: str) -> list[int]:
    """Six JSON integers in the release order -> the package's box order. Floats, booleans and strings are
    an error naming ``where`` (a rounded box would silently move the region)."""
    if not isinstance(value, (list, tuple)) or len(value) != 6:
        raise FormError(f"{where}: {value!r:.80}: expected a list of six integers "
                        f"[start_slice, end_slice, x_min, x_max, y_min, y_max]", KIND_BOX)
    bad = [v for v in value if type(v) is not int]  # bool is a subclass of int: excluded on purpose
    if bad:
        raise FormError(f"{where}: {list(value)!r:.80} has non-integer values {bad!r:.40}; expected six integers "
                        f"(no floats, booleans or strings)", KIND_BOX)
    return release_box_to_package(value)


def item_box(item: Mapping[str, Any], where: str) -> tuple[Optional[list[int]], Optional[str]]:
    """The box under the first of ``BOX_KEYS`` the item holds (not null), and the form ``item key '<key>'``."""
    for key in BOX_KEYS:
        if item.get(key) is not None:
            return strict_box(item[key], f"{where}: '{key}'"), f"item key '{key}'"
    return None, None


_BRACKETS_RE = re.compile(r"\[([^\[\]{}]*)\]")
_TOKEN_RE = re.compile(r"\s*([+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|true|false|True|False)\s*")


def answer_box(answer: str, where: str) -> Optional[list[int]]:
    """The box written in an answer: a bracketed list of six numbers, with or without box tokens or a
    ``Location:`` label, anywhere in the text (a JSON ``"bbox": [...]`` too). None when there is none.

    Several different boxes, or one with non-integer values, are an error naming ``where``.
    """
    found: list[list[str]] = []
    for m in _BRACKETS_RE.finditer(answer):
        parts = m.group(1).split(",")
        if len(parts) != 6:
            continue
        toks = [_TOKEN_RE.fullmatch(p) for p in parts]
        if all(toks):
            found.append([t.group(1) for t in toks])  # type: ignore[union-attr]
    distinct = {tuple(f) for f in found}
    if not distinct:
        return None
    if len(distinct) > 1:
        shown = " and ".join(f"[{', '.join(d)}]" for d in list(distinct)[:2])
        raise FormError(f"{where}: the answer holds {len(distinct)} different boxes ({shown}); expected one",
                        KIND_BOX)
    vals = found[0]
    if not all(re.fullmatch(r"[+-]?\d+", v) for v in vals):
        raise FormError(f"{where}: box [{', '.join(vals)}] in the answer has non-integer values; expected six "
                        f"integers", KIND_BOX)
    return release_box_to_package([int(v) for v in vals])
