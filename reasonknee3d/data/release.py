"""Release loader: one normalized ``Sample`` per (volume, question) of a 3DReasonKnee-layout release.

Reads ``data/split_files/<split>_split.csv`` (volumes), ``data/generate_data/<split>.json`` (items) and
``data/question_files/question_subregion_mapping.json`` (label ids of each question's region) under a
release root. Works on the public release, whose items may lack ``question_id`` and ``box``:

- the question id then comes from the finding key of ``final_diagnosis`` (matched case-, space-,
  underscore- and hyphen-insensitively against the schema, ``MOAKS_scores``/``MOAKS_grade`` unwrapped);
- the box comes from an item key, else from six integers written in the answer, else from the volume's mask
  and the question's subregion labels (the box ``boxes.box_from_mask`` gives), in the coordinates of the
  loaded ``(S, H, W)`` array; each mask is read once per volume and the boxes of all its labels are found in
  one pass (~50x faster than 69 scans).

Every piece may come in several forms (``data/release_forms.py`` lists them): upstream question files, CSVs
without a ``path`` column, image paths from another machine found by name under ``images=DIR``, diagnoses
as JSON strings or only in the answer, ``knee_side`` in any case or as L/R. ``ReleaseLoader.forms`` counts
which form each item's pieces came in; ``reasonknee3d check-release`` reports them.

Answers are rebuilt with ``answer.format_answer`` from the item's reasoning lines, the box and the
validated severity, so every sample has the same answer format whatever the release wrote.
"""
from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
from scipy import ndimage

from ..answer import check_severity, format_answer
from ..boxes import validate_box
from ..constants import BOX_START, DIAGNOSIS_PREFIX, LOCATION_PREFIX
from ..io_utils import write_jsonl
from ..schema import QuestionSpec, get_question, load_schema
from . import release_forms as rf
from .io import VolumeError, inspect_volume, load_mask

SPLITS = ("train", "val", "test", "train_balanced", "test_balanced")
"""Splits a release may hold; ``<base>_balanced`` reads ``generate_data/<base>_balanced.json`` with the
volumes of ``split_files/<base>_split.csv``."""
CSV_COLUMNS = ("patient_id", "time", "study_folder", "series_folder", "knee_side", "path",
               "image_filepath", "label_filepath")
REQUIRED_CSV_COLUMNS = tuple(c for c in CSV_COLUMNS if c != "path")
"""The upstream code reads these; ``path`` (the package's synthetic release writes it) is optional."""
_WRAPPERS = ("moaksscores", "moaksgrade", "finaldiagnosis")


class ReleaseError(ValueError):
    """A release file or item that cannot be used; the message names the file, the item and the problem.
    ``kind`` (one of ``release_forms.KIND_*``) groups skipped items in batch reports."""

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind


def csv_path(root: Path, split: str) -> Path:
    """The split CSV a split's volumes come from (``*_balanced`` use their base split's)."""
    return root / "data" / "split_files" / f"{split.removesuffix('_balanced')}_split.csv"


@dataclass(frozen=True)
class VolumeRecord:
    """One row of a split CSV."""
    volume_id: str
    patient_id: str
    time: str
    knee_side: str
    image_path: Path
    mask_path: Optional[Path]
    image_form: str = rf.FORM_PATH_RELATIVE
    """How ``image_filepath`` was resolved (``release_forms.FORM_PATH_*``)."""
    mask_form: Optional[str] = None
    """How ``label_filepath`` was resolved; None without one."""
    side_form: str = rf.FORM_SIDE_WORD
    """How ``knee_side`` was written (``release_forms.FORM_SIDE_*``); ``knee_side`` is always left/right."""
    mask_problem: Optional[str] = None
    """Why the mask cannot be used (a path refused), reported only when a box must come from it."""
    line: int = 0
    """Line of the row in its CSV (the header is line 1)."""


@dataclass(frozen=True)
class RowProblem:
    """A split CSV row that cannot be used, and why."""
    csv: Path
    line: int
    volume_id: Optional[str]
    reason: str
    kind: str


@dataclass(frozen=True)
class Sample:
    """One (volume, question) of a split, normalized."""
    sample_id: str
    """``f"{volume_id}:q{question_id}"``; unique within a split."""
    volume_id: str
    patient_id: str
    split: str
    image_path: Path
    """Absolute path of the volume's NIfTI."""
    mask_path: Optional[Path]
    question_id: int
    prompt: str
    answer: str
    """First reasoning line, ``Location:`` line (voxel box text, absent without a box), the other reasoning
    lines, ``Final diagnosis:`` line (``answer.format_answer``)."""
    severity: dict[str, int]
    """Schema field key -> grade, validated against the question's grade ranges."""
    box: Optional[list[int]]
    """Inclusive voxel box of the loaded ``(S, H, W)`` array, or None when the question has no region."""
    knee_side: str
    box_source: str = field(default="", compare=False)
    """Where the box came from (``item key 'box'``, ``release_forms.FORM_BOX_*``); not part of equality, so
    the same sample read from differently written releases compares equal."""


@dataclass(frozen=True)
class Skipped:
    """An item a batch command could not use, and why."""
    item: str
    reason: str
    kind: str = ""
    """Group of the reason (``release_forms.KIND_*``), for counts in reports."""


@dataclass
class BatchResult:
    """Outcome of a batch command: what was written, and what was skipped (listed in ``skipped_path``)."""
    out: Path
    n_done: int
    skipped: list[Skipped] = field(default_factory=list)
    skipped_path: Optional[Path] = None

    @property
    def ok(self) -> bool:
        return not self.skipped


def write_skipped(path: Path, skipped: list[Skipped]) -> Optional[Path]:
    """Write the skipped list as JSONL (or remove a stale one when nothing was skipped)."""
    if not skipped:
        path.unlink(missing_ok=True)
        return None
    write_jsonl(path, (asdict(s) for s in skipped))
    return path


def volume_id_of(image_path: str | Path) -> str:
    """File name without ``.nii.gz`` / ``.nii``: ``9000099_00m_1.2.3_4.5_right``."""
    name = rf.file_name(str(image_path))
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ReleaseError(f"image path {str(image_path)!r} does not end in .nii.gz or .nii")


def knee_side_of(image_path: str | Path) -> str:
    """``left`` or ``right`` from a release file name (``<study>_<series>_<side>.nii.gz``)."""
    side = volume_id_of(image_path).rsplit("_", 1)[-1].lower()
    if side not in ("left", "right"):
        raise ReleaseError(f"{image_path}: cannot tell the knee side; expected a release file name ending in "
                           f"_left.nii.gz or _right.nii.gz")
    return side


def _norm(key: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(key).lower())


@lru_cache(maxsize=1)
def _specs_by_finding_key() -> dict[str, QuestionSpec]:
    # Normalized finding keys are unique across the 69 questions (checked by the release tests).
    return {_norm(q.finding_key): q for q in load_schema().values()}


@dataclass(frozen=True)
class _Parsed:
    question: QuestionSpec
    severity: dict[str, int]
    box: Optional[list[int]]
    reasoning: list[str]
    box_form: Optional[str] = None
    diagnosis_form: str = rf.FORM_DIAG_OBJECT
    qid_form: str = rf.FORM_QID_ITEM


def _unwrap_diagnosis(diag: dict) -> dict:
    """The mapping that holds the finding keys: ``MOAKS_scores`` / ``MOAKS_grade`` / ``Final diagnosis``
    wrappers are opened (other keys beside them, such as a box, are ignored) until a finding key shows."""
    by_key = _specs_by_finding_key()
    for _ in range(4):
        if any(_norm(k) in by_key for k in diag):
            return diag
        inner = [v for k, v in diag.items() if _norm(k) in _WRAPPERS and isinstance(v, dict)]
        if len(inner) != 1:
            return diag
        diag = inner[0]
    return diag


def _reasoning_lines(answer: str) -> list[str]:
    """The reasoning steps of an answer: its lines up to the diagnosis / JSON part, less the location line
    wherever it stands (``answer.format_answer`` puts it back in the package's place)."""
    out = []
    for line in answer.splitlines():
        s = line.strip()
        low = s.lower()
        if low.startswith((DIAGNOSIS_PREFIX.lower(), "{", "```")):
            break
        if s and not (low.startswith(LOCATION_PREFIX.lower()) or BOX_START in s):
            out.append(s)
    return out


def _label_boxes(mask: np.ndarray) -> dict[int, list[int]]:
    """Box of every label present in ``mask``, from one pass (``box_from_mask`` per question would scan
    the 24M-voxel mask once per question: 0.10 s each vs 0.13 s for all labels at 160x384x384)."""
    out = {}
    for label, slices in enumerate(ndimage.find_objects(mask), start=1):
        if slices is not None:
            out[label] = [v for sl in slices for v in (sl.start, sl.stop - 1)]
    return out


def _union_box(boxes: list[list[int]]) -> Optional[list[int]]:
    """Smallest box holding all ``boxes`` (the box of the union of their labels); None if there are none."""
    if not boxes:
        return None
    b = np.asarray(boxes)
    return [int(v) for pair in zip(b[:, 0::2].min(axis=0), b[:, 1::2].max(axis=0)) for v in pair]


class ReleaseLoader:
    """Reads one release root; ``iter_samples(split)`` yields its samples grouped by volume.

    ``images``: a folder where volumes and masks whose written paths do not exist here (paths from another
    machine) are found by file name (indexed with one walk, on first use).
    """

    def __init__(self, root: str | Path, images: str | Path | None = None) -> None:
        self.root = Path(root).resolve()
        if not (self.root / "data").is_dir():
            raise ReleaseError(f"{self.root}: not a release root (expected a data/ folder with split_files/, "
                               f"generate_data/, question_files/)")
        try:
            self.images = rf.NameIndex(images) if images is not None else None
        except rf.FormError as e:
            raise ReleaseError(str(e), e.kind) from None
        self.forms: dict[str, dict[str, Counter]] = {}
        """split -> piece (``question id``, ``diagnosis``, ``box``) -> form -> count, over the samples the last
        ``iter_samples(split)`` yielded."""

    def _path(self, value: str) -> Path:
        # Release paths are relative to the root; absolute ones are accepted as they are.
        return Path(os.path.normpath(self.root / value))

    def _read_json(self, rel: str) -> Any:
        path = self.root / rel
        if not path.is_file():
            raise ReleaseError(f"{path}: file not found")
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReleaseError(f"{path}: invalid JSON ({e})") from None

    @cached_property
    def subregion_mapping(self) -> dict[int, list[int]]:
        """Question id -> label ids whose union is the question's region."""
        rel = "data/question_files/question_subregion_mapping.json"
        raw = self._read_json(rel)
        try:
            return {int(q): [int(v) for v in ids] for q, ids in raw.items()}
        except (AttributeError, TypeError, ValueError):
            raise ReleaseError(f"{self.root / rel}: expected {{\"<question id>\": [label ids]}}") from None

    @property
    def has_subregion_mapping(self) -> bool:
        return (self.root / "data/question_files/question_subregion_mapping.json").is_file()

    # --- question files -------------------------------------------------------------------------------

    def question_files(self) -> dict[str, Path]:
        """Question files present, by form (``release_forms.QUESTION_FILES``: package, guided, plain)."""
        folder = self.root / "data" / "question_files"
        return {form: folder / name for form, name in rf.QUESTION_FILES.items() if (folder / name).is_file()}

    def question_texts(self, style: str) -> dict[int, str]:
        """The release's question texts for a prompt style, ``{question id: text}``.

        ``guided``: ``questions_nobbox_guided.json``. ``plain``: ``questions_nobbox_zeroshot.json``, else the
        package's ``questions.json``. A style none of whose files is present is an error naming them.
        """
        if style not in rf.QUESTION_TEXT_STYLES:
            raise ReleaseError(f"unknown question text style {style!r}; expected one of {list(rf.QUESTION_TEXT_STYLES)}")
        present = self.question_files()
        for form in rf.QUESTION_TEXT_STYLES[style]:
            if form in present:
                try:
                    return rf.read_question_file(present[form])
                except rf.FormError as e:
                    raise ReleaseError(str(e), e.kind) from None
        wanted = [rf.QUESTION_FILES[f] for f in rf.QUESTION_TEXT_STYLES[style]]
        raise ReleaseError(f"{self.root / 'data' / 'question_files'}: no {style} question texts; expected one of "
                           f"{wanted}")

    # --- split CSVs -----------------------------------------------------------------------------------

    def volume_rows(self, split: str) -> tuple[list[VolumeRecord], list[RowProblem]]:
        """Rows of the split's CSV as records, and the rows that cannot be used with their reasons
        (a bad or contradicting ``knee_side``, a path outside the release root, an ambiguous file name).
        Missing files are not a problem here: the records say so (``image_form``) and items report it."""
        if split not in SPLITS:
            raise ReleaseError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
        path = csv_path(self.root, split)
        if not path.is_file():
            raise ReleaseError(f"{path}: file not found")
        records, problems = [], []
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in REQUIRED_CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ReleaseError(f"{path}: missing columns {missing}; expected {list(REQUIRED_CSV_COLUMNS)} "
                                   f"(and optionally 'path')")
            for i, row in enumerate(reader, start=2):
                where = f"{path} line {i}"
                written = (row["image_filepath"] or "").strip()
                vid = None
                try:
                    if not written:
                        raise rf.FormError(f"{where}: empty image_filepath", rf.KIND_CSV_ROW)
                    try:
                        vid = volume_id_of(written)
                    except ReleaseError as e:
                        raise rf.FormError(f"{where}: {e}", rf.KIND_CSV_ROW) from None
                    side, side_form = rf.read_knee_side(row["knee_side"], written, where)
                    image, image_form = rf.resolve_path(written, self.root, self.images, f"{where} image_filepath")
                except rf.FormError as e:
                    problems.append(RowProblem(path, i, vid, str(e), e.kind))
                    continue
                label = (row["label_filepath"] or "").strip()
                mask = mask_form = mask_problem = None
                if label:
                    try:
                        mask, mask_form = rf.resolve_path(label, self.root, self.images, f"{where} label_filepath")
                    except rf.FormError as e:
                        mask_problem = str(e)
                records.append(VolumeRecord(
                    volume_id=vid, patient_id=row["patient_id"], time=row["time"], knee_side=side, image_path=image,
                    mask_path=mask, image_form=image_form, mask_form=mask_form, side_form=side_form,
                    mask_problem=mask_problem, line=i))
        return records, problems

    def volumes(self, split: str) -> list[VolumeRecord]:
        """Rows of the split's CSV (``*_balanced`` use their base split's CSV); the first unusable row is an
        error naming the file, line and value (``volume_rows`` lists them all instead)."""
        records, problems = self.volume_rows(split)
        if problems:
            raise ReleaseError(problems[0].reason, problems[0].kind)
        return records

    def _items(self, split: str) -> list[dict]:
        rel = f"data/generate_data/{split}.json"
        items = self._read_json(rel)
        if not isinstance(items, list):
            raise ReleaseError(f"{self.root / rel}: expected a JSON list of items, got {type(items).__name__}")
        return items

    # --- items ----------------------------------------------------------------------------------------

    def iter_samples(self, split: str, skipped: Optional[list[Skipped]] = None) -> Iterator[Sample]:
        """Yield the split's samples. Bad items raise ``ReleaseError``/``VolumeError``, or, when ``skipped``
        is a list, are appended to it with their reason and left out."""
        records, problems = self.volume_rows(split)
        volumes = {v.volume_id: v for v in records}
        bad_rows = {p.volume_id: p for p in problems if p.volume_id is not None}
        items_file = self.root / "data" / "generate_data" / f"{split}.json"
        mapping = self.subregion_mapping if self.has_subregion_mapping else None
        forms: dict[str, Counter] = {"question id": Counter(), "diagnosis": Counter(), "box": Counter()}
        self.forms[split] = forms

        def fail(where: str, reason: str, kind: str) -> None:
            if skipped is None:
                raise ReleaseError(f"{where}: {reason}", kind)
            skipped.append(Skipped(where, reason, kind))

        for p in problems:  # rows no item can name (no usable file name)
            if p.volume_id is None:
                fail(f"{p.csv} line {p.line}", p.reason.removeprefix(f"{p.csv} line {p.line}: "), p.kind)

        # Group items by volume (first-appearance order) so each volume's header and mask are read once.
        groups: OrderedDict[str, list[tuple[int, dict]]] = OrderedDict()
        for i, item in enumerate(self._items(split)):
            where = f"{items_file} item {i}"
            if not isinstance(item, dict) or not isinstance(item.get("image"), str):
                fail(where, "expected an object with an 'image' path", rf.KIND_BAD_ITEM)
                continue
            try:
                vid = volume_id_of(item["image"])
            except ReleaseError as e:
                fail(where, str(e), rf.KIND_BAD_ITEM)
                continue
            if vid in bad_rows:
                fail(where, bad_rows[vid].reason, bad_rows[vid].kind)
                continue
            if vid not in volumes:
                fail(where, f"image {item['image']!r} is not listed in the {split} split CSV "
                            f"({csv_path(self.root, split).name})", rf.KIND_NOT_IN_CSV)
                continue
            groups.setdefault(vid, []).append((i, item))

        seen: set[str] = set()
        for vid, entries in groups.items():
            vol = volumes[vid]
            try:
                if vol.image_form == rf.FORM_PATH_MISSING:
                    hint = (f"; no file named {vol.image_path.name!r} under the images folder {self.images.root}"
                            if self.images is not None else "")
                    raise VolumeError(f"{vol.image_path}: file not found{hint}")
                meta = inspect_volume(vol.image_path)
            except VolumeError as e:
                kind = rf.KIND_IMAGE_MISSING if "file not found" in str(e) else rf.KIND_IMAGE_UNREADABLE
                for i, _ in entries:
                    fail(f"{items_file} item {i}", str(e), kind)
                continue
            # Boxes of the volume's mask labels, or the error reading the mask: read at most once.
            label_boxes: Optional[dict[int, list[int]] | ReleaseError] = None
            for i, item in entries:
                where = f"{items_file} item {i} ({vid})"
                try:
                    parsed = self._parse_item(item, where)
                    qid = parsed.question.question_id
                    box, box_form = parsed.box, parsed.box_form
                    if box is not None:
                        try:
                            box = validate_box(box, meta.shape)
                        except ValueError as e:
                            raise ReleaseError(f"{where}: bad {box_form}: {e}", rf.KIND_BOX) from None
                    elif mapping is None:
                        box_form = rf.FORM_BOX_NONE_SOURCE
                    elif qid in mapping:
                        if label_boxes is None:
                            label_boxes = self._mask_label_boxes(vol, meta, where)
                        if isinstance(label_boxes, ReleaseError):
                            raise label_boxes
                        box = _union_box([label_boxes[k] for k in mapping[qid] if k in label_boxes])
                        box_form = rf.FORM_BOX_MASK if box is not None else rf.FORM_BOX_NONE_REGION
                    else:
                        box_form = rf.FORM_BOX_NONE_REGION
                except (ReleaseError, VolumeError) as e:
                    fail(where, str(e).removeprefix(f"{where}: "), getattr(e, "kind", rf.KIND_BAD_ITEM))
                    continue
                sid = f"{vid}:q{qid}"
                if sid in seen:
                    fail(where, f"duplicate sample {sid} (question {qid} asked twice for this volume)",
                         rf.KIND_DUPLICATE)
                    continue
                seen.add(sid)
                forms["question id"][parsed.qid_form] += 1
                forms["diagnosis"][parsed.diagnosis_form] += 1
                forms["box"][box_form] += 1
                yield Sample(
                    sample_id=sid, volume_id=vid, patient_id=vol.patient_id, split=split,
                    image_path=vol.image_path, mask_path=vol.mask_path, question_id=qid,
                    prompt=item["prompt"],
                    answer=format_answer(parsed.question, parsed.reasoning, box, parsed.severity),
                    severity=parsed.severity, box=box, knee_side=vol.knee_side, box_source=box_form)

    def _mask_label_boxes(self, vol: VolumeRecord, meta: Any, where: str) -> dict[int, list[int]] | ReleaseError:
        """Boxes of every label of the volume's mask, or the error that stops reading it (returned, so that
        every item of the volume reports it without reading the mask again)."""
        if vol.mask_problem is not None:
            return ReleaseError(f"{where}: no box in the item or its answer, and the mask path is refused: "
                                f"{vol.mask_problem}", rf.KIND_PATH_REFUSED)
        if vol.mask_path is None:
            return ReleaseError(f"{where}: no box in the item or its answer, and no label_filepath in the CSV to "
                                f"derive it from", rf.KIND_NO_MASK_FOR_BOX)
        if vol.mask_form == rf.FORM_PATH_MISSING:
            hint = (f"; no file named {vol.mask_path.name!r} under the images folder {self.images.root}"
                    if self.images is not None else "")
            return ReleaseError(f"{vol.mask_path}: file not found{hint}", rf.KIND_MASK_MISSING)
        try:
            return _label_boxes(load_mask(vol.mask_path, meta))
        except VolumeError as e:
            kind = rf.KIND_MASK_MISSING if "file not found" in str(e) else rf.KIND_MASK_UNUSABLE
            return ReleaseError(str(e), kind)

    def _parse_item(self, item: Mapping[str, Any], where: str) -> _Parsed:
        if not isinstance(item.get("prompt"), str) or not isinstance(item.get("answer"), str):
            raise ReleaseError(f"{where}: 'prompt' and 'answer' must be strings", rf.KIND_BAD_ITEM)
        try:
            candidates, diagnosis_form = rf.diagnosis_candidates(item, where)
        except rf.FormError as e:
            raise ReleaseError(str(e), e.kind) from None
        diags = [_unwrap_diagnosis(c) for c in candidates]

        if item.get("question_id") is not None:
            try:
                spec = get_question(item["question_id"])
            except KeyError as e:
                raise ReleaseError(f"{where}: {e.args[0]}", rf.KIND_QUESTION) from None
            diag = next((d for d in diags if any(_norm(k) == _norm(spec.finding_key) for k in d)), diags[0])
            qid_form = rf.FORM_QID_ITEM
        else:
            by_key = _specs_by_finding_key()
            matches = [[by_key[_norm(k)] for k in d if _norm(k) in by_key] for d in diags]
            pick = next((j for j, m in enumerate(matches) if len(m) == 1), None)
            if pick is None:
                diag, found = diags[0], matches[0]
                raise ReleaseError(f"{where}: cannot tell the question: final_diagnosis keys {list(diag)} match "
                                   f"{len(found)} schema finding keys; expected exactly one", rf.KIND_QUESTION)
            diag, spec = diags[pick], matches[pick][0]
            qid_form = rf.FORM_QID_FINDING

        entry = [v for k, v in diag.items() if _norm(k) == _norm(spec.finding_key)]
        if len(entry) != 1:
            raise ReleaseError(f"{where}: final_diagnosis has no entry for question {spec.question_id}'s finding "
                               f"{spec.finding_key!r} (keys: {list(diag)})", rf.KIND_DIAGNOSIS)
        severity = self._severity(spec, entry[0], where)

        try:
            box, box_form = rf.item_box(item, where)
            if box is None:
                box = rf.answer_box(item["answer"], where)
                box_form = rf.FORM_BOX_ANSWER if box is not None else None
        except rf.FormError as e:
            raise ReleaseError(str(e), e.kind) from None
        return _Parsed(spec, severity, box, _reasoning_lines(item["answer"]), box_form, diagnosis_form, qid_form)

    @staticmethod
    def _severity(spec: QuestionSpec, value: Any, where: str) -> dict[str, int]:
        if not isinstance(value, dict):
            if len(spec.fields) != 1:
                raise ReleaseError(f"{where}: a bare grade {value!r} for question {spec.question_id}, which has "
                                   f"fields {list(spec.field_keys)}", rf.KIND_DIAGNOSIS)
            value = {spec.field_keys[0]: value}
        by_norm = {_norm(k): k for k in spec.field_keys}
        sev: dict[str, Any] = {}
        for k, g in value.items():
            key = by_norm.get(_norm(k), k)
            if isinstance(g, str) and re.fullmatch(r"\s*-?\d+\s*", g):
                g = int(g)
            sev[key] = g
        try:
            return check_severity(spec, sev, where)
        except ValueError as e:
            raise ReleaseError(str(e), rf.KIND_DIAGNOSIS) from None


def cache_root(root: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The folder holding a release's caches (``volumes/``, ``slice_features/``): ``cache_dir`` when given, else
    ``<root>/cache``."""
    return Path(cache_dir) if cache_dir is not None else Path(root).resolve() / "cache"


def iter_samples(root: str | Path, split: str, skipped: Optional[list[Skipped]] = None,
                 images: str | Path | None = None) -> Iterator[Sample]:
    """Samples of one split of the release at ``root`` (see ``ReleaseLoader.iter_samples``; ``images``: the
    folder where files whose written paths do not exist here are found by name)."""
    return ReleaseLoader(root, images=images).iter_samples(split, skipped)


def reference_row(sample: Sample) -> dict[str, Any]:
    """One line of the scorer's references file (docs/benchmark.md, "Inputs")."""
    return {"sample_id": sample.sample_id, "volume_id": sample.volume_id, "question_id": sample.question_id,
            "severity": sample.severity, "box": sample.box, "split": sample.split}


def export_references(root: str | Path, split: str, out: str | Path, images: str | Path | None = None) -> BatchResult:
    """Write the split's references JSONL (good items only) and ``<out stem>.skipped.jsonl`` for the rest."""
    out = Path(out)
    skipped: list[Skipped] = []
    n = write_jsonl(out, (reference_row(s) for s in iter_samples(root, split, skipped, images=images)))
    skipped_path = write_skipped(out.with_name(out.name.removesuffix(".jsonl") + ".skipped.jsonl"), skipped)
    return BatchResult(out=out, n_done=n, skipped=skipped, skipped_path=skipped_path)
