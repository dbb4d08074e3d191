"""ReasonKnee-Bench scoring: read references and predictions, parse, score, write the report (docs/benchmark.md).

The scorer needs only the references file (never the images), so anyone can score their own model's
outputs. Bad references stop the run with the file and line; bad prediction lines, predictions for
unknown samples and duplicate predictions are reported, counted and ignored (a reference left without
a prediction is scored as an output that failed to parse).
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import chain
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import numpy as np

from ..answer import check_severity
from ..boxes import iou_3d, repair_boxes, validate_box
from ..constants import AXIS_NAMES, BENCH_VERSION
from ..data.release_forms import side_of_file_name
from ..schema import load_schema
from .metrics import (MISSING, ScoreArrays, acc_iou, box_axis_errors, confusion_matrix, majority_boxes,
                      majority_grades, miou, summarize)
from ..parsing import ParsedOutput, parse_outputs

MAX_ISSUES_LISTED = 50
"""Input problems quoted in the report (all of them are counted)."""
ORDINAL_GRADES = (0, 1, 2, 3)
"""Fields with exactly this grade range enter qwk and get a confusion matrix."""


class ScoreInputError(ValueError):
    """A references (or majority-source) file the scorer cannot trust; the message names file and line."""


@dataclass(slots=True)
class Reference:
    """One (volume, question) line of a references file (``severity`` in schema field order)."""

    sample_id: str
    question_id: int
    severity: dict[str, int]
    box: Optional[list[int]]
    volume_id: str = ""
    split: str = ""
    line: int = 0
    """Line number in the file it came from (for messages)."""


@dataclass
class Predictions:
    """Raw outputs by sample id, plus what was wrong with the file."""

    source: str = ""
    """The file read (for messages)."""
    outputs: dict[str, Optional[str]] = field(default_factory=dict)
    line_of: dict[str, int] = field(default_factory=dict)
    lines: int = 0
    """Non-blank lines read."""
    malformed: int = 0
    duplicates: int = 0
    issues: list[str] = field(default_factory=list)
    """Messages for the first problems, each with ``file:line``."""

    def _issue(self, message: str) -> None:
        if len(self.issues) < MAX_ISSUES_LISTED:
            self.issues.append(message)


JSON_CHUNK_LINES = 2048
"""Lines decoded by one ``json.loads`` call (a bad line sends only its chunk to the per-line path)."""


def _json_line(path: Path, lineno: int, line: str) -> tuple[Optional[dict], str]:
    """The JSON object on a line, or (None, why not)."""
    try:
        obj = json.loads(line.strip())  # stripped, so error columns count from the line's first character
    except json.JSONDecodeError as e:
        return None, f"{path}:{lineno}: not valid JSON: {e.msg} (column {e.colno})"
    except RecursionError:
        return None, f"{path}:{lineno}: not valid JSON: nested too deeply"
    if not isinstance(obj, dict):
        return None, f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
    return obj, ""


def _json_lines(path: Path, errors: str) -> Iterator[tuple[int, Optional[dict], str]]:
    """``(line number, object or None, why not)`` for each non-blank line of a JSONL file.

    Undecodable bytes raise ``ScoreInputError`` (``errors="strict"``) or become U+FFFD ("replace").
    Lines are decoded a chunk at a time as one JSON array: one C-level call instead of one Python-level
    ``json.loads`` per line roughly halves the reading time of a 100k-line file.
    """
    data = path.read_bytes()
    try:
        text = data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise ScoreInputError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from None
    # Split on "\n" only, like file iteration: str.splitlines would also split on U+2028 inside strings.
    numbered = [(i, line) for i, line in enumerate(text.split("\n"), 1) if line and not line.isspace()]
    for c in range(0, len(numbered), JSON_CHUNK_LINES):
        chunk = numbered[c:c + JSON_CHUNK_LINES]
        try:
            objs = json.loads("[" + ",".join(line for _, line in chunk) + "]")
        except (ValueError, RecursionError):
            objs = None
        # Every line yields at least one value or the array fails to parse, so equal lengths mean one each.
        if objs is not None and len(objs) == len(chunk):
            for (lineno, _), obj in zip(chunk, objs):
                if isinstance(obj, dict):
                    yield lineno, obj, ""
                else:
                    yield lineno, None, f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
        else:
            for lineno, line in chunk:
                yield lineno, *_json_line(path, lineno, line)


def read_references(path: str | os.PathLike) -> list[Reference]:
    """Read and validate a references JSONL file; raises ``ScoreInputError`` naming file and line.

    Checks: valid JSON object per line, a non-empty string ``sample_id``, a known integer
    ``question_id``, a ``severity`` with exactly the question's fields and in-range integer grades, and
    ``box`` either null (or absent) or six integers; then, over the whole file, that sample ids are
    unique and boxes non-negative with min <= max per axis.
    """
    path = Path(path)
    schema = load_schema()
    refs: list[Reference] = []
    validated: dict[tuple, dict[str, int]] = {}  # (question id, *severity items) -> checked severity
    for lineno, obj, why in _json_lines(path, errors="strict"):
        if obj is None:
            raise ScoreInputError(why)
        sid, qid, severity, box = obj.get("sample_id"), obj.get("question_id"), obj.get("severity"), obj.get("box")
        if type(sid) is not str or not sid:
            raise ScoreInputError(f"{path}:{lineno}: 'sample_id' must be a non-empty string, got {sid!r}")
        if type(qid) is not int or qid not in schema:
            raise ScoreInputError(f"{path}:{lineno}: unknown question_id {qid!r}; expected an integer in "
                                  f"{min(schema)}..{max(schema)} (reasonknee_question_schema.json)")
        if type(severity) is not dict:
            raise ScoreInputError(f"{path}:{lineno}: 'severity' must be an object of field -> grade, "
                                  f"got {severity!r:.80}")
        # Few distinct severities exist per question: validate each once (check_severity also orders
        # the fields as the schema does, which scoring relies on).
        try:
            key: Optional[tuple] = (qid, *severity.items())
            checked = validated.get(key)
        except TypeError:  # an unhashable grade (a list, an object): check_severity words the error
            key, checked = None, None
        if checked is None:
            try:
                checked = check_severity(schema[qid], severity, where=f"{path}:{lineno}")
            except ValueError as e:
                raise ScoreInputError(str(e)) from None
            if key is not None:
                validated[key] = checked
        if box is not None and (type(box) is not list or len(box) != 6):
            raise ScoreInputError(_bad_box_message(path, lineno, box))
        refs.append(Reference(sid, qid, dict(checked), box, str(obj.get("volume_id", "")),
                              str(obj.get("split", "")), lineno))
    if not refs:
        raise ScoreInputError(f"{path}: no references (the file is empty)")
    _check_unique_ids(path, refs)
    _check_boxes(path, [r for r in refs if r.box is not None])
    return refs


def _bad_box_message(path: Path, lineno: int, box: object) -> str:
    return (f"{path}:{lineno}: 'box' must be null or 6 integers [a0_min, a0_max, a1_min, a1_max, a2_min, a2_max], "
            f"got {box!r:.80}")


def _check_unique_ids(path: Path, refs: Sequence[Reference]) -> None:
    """Checked after reading (one set instead of a dict update per line); the message names both lines."""
    if len({r.sample_id for r in refs}) == len(refs):
        return
    first: dict[str, int] = {}
    for r in refs:
        if r.sample_id in first:
            raise ScoreInputError(f"{path}:{r.line}: duplicate sample_id {r.sample_id!r} "
                                  f"(first on line {first[r.sample_id]})")
        first[r.sample_id] = r.line


def _check_boxes(path: Path, boxed: Sequence[Reference]) -> None:
    """Integer values, non-negative, min <= max per axis: checked for all boxes at once."""
    if not boxed:
        return
    if set(map(type, chain.from_iterable(r.box for r in boxed))) != {int}:
        ref = next(r for r in boxed if any(type(v) is not int for v in r.box))
        raise ScoreInputError(_bad_box_message(path, ref.line, ref.box))
    try:
        arr, _ = _box_array([r.box for r in boxed])  # (B, 6)
    except OverflowError:
        ref = next(r for r in boxed if any(abs(v) >= 2 ** 63 for v in r.box))
        raise ScoreInputError(f"{path}:{ref.line}: invalid box {ref.box}: coordinates must fit in 64 bits") from None
    _, reversed_ = repair_boxes(arr)
    bad = np.flatnonzero(reversed_ | (arr < 0).any(axis=1))
    if bad.size:
        ref = boxed[int(bad[0])]
        try:  # validate_box words the message
            validate_box(ref.box)
        except ValueError as e:
            raise ScoreInputError(f"{path}:{ref.line}: invalid box: {e}") from None


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Read a predictions JSONL file (``{"sample_id": str, "output": str}``; extra keys ignored).

    Never raises on content: malformed lines and repeated sample ids (the first line counts) are
    recorded in the result. ``output`` may be null (the model answered nothing).
    """
    path = Path(path)
    preds = Predictions(source=str(path))
    for lineno, obj, why in _json_lines(path, errors="replace"):
        preds.lines += 1
        if obj is not None:
            sid, output = obj.get("sample_id"), obj.get("output")
            if not isinstance(sid, str):
                why = f"{path}:{lineno}: 'sample_id' must be a string, got {sid!r:.60}"
            elif "output" not in obj or not (output is None or isinstance(output, str)):
                why = (f"{path}:{lineno}: 'output' must be the raw model text (a string), "
                       f"got {type(output).__name__ if 'output' in obj else 'no output key'}")
        if why:
            preds.malformed += 1
            preds._issue(why + "; line ignored")
            continue
        if sid in preds.outputs:
            preds.duplicates += 1
            preds._issue(f"{path}:{lineno}: duplicate sample_id {sid!r} (first on line {preds.line_of[sid]}); "
                          f"line ignored")
            continue
        preds.outputs[sid] = output
        preds.line_of[sid] = lineno
    return preds


# --- scoring ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _SchemaIndex:
    """Integer ids for the schema's fields and groups, so scoring runs on numpy arrays."""

    fields: dict[int, tuple[tuple[str, int], ...]]
    """question id -> (field key, field id) in schema field order"""
    field_group: np.ndarray
    """(F,) field id -> (category, field key) group id"""
    field_ordinal: np.ndarray
    """(F,) bool: field range is 0-3"""
    groups: list[tuple[str, str]]
    """group id -> (category, field key)"""
    num_questions: int


@lru_cache(maxsize=1)
def _schema_index() -> _SchemaIndex:
    schema = load_schema()
    fields: dict[int, tuple[tuple[str, int], ...]] = {}
    group_of: dict[tuple[str, str], int] = {}
    field_group, field_ordinal = [], []
    for q in schema.values():
        ids = []
        for f in q.fields:
            ids.append((f.key, len(field_group)))
            field_group.append(group_of.setdefault((q.category, f.key), len(group_of)))
            field_ordinal.append(f.grades == ORDINAL_GRADES)
        fields[q.question_id] = tuple(ids)
    return _SchemaIndex(fields, np.array(field_group), np.array(field_ordinal), list(group_of),
                        max(schema) + 1)


@dataclass
class ScoreResult:
    """Everything the report writer needs."""

    report: dict
    per_sample: list[dict]
    iou: np.ndarray
    """(B,) model IoU over references with a box"""
    majority_iou: np.ndarray
    """(B,) majority-baseline IoU over the same references"""


def _pairs(refs: Sequence[Reference], idx: _SchemaIndex) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference index, field id, true grade) per (reference, field) pair, in reference order."""
    fields = [idx.fields[r.question_id] for r in refs]
    pair_ref = np.repeat(np.arange(len(refs)), [len(f) for f in fields])
    pair_field = np.array([fid for f in fields for _, fid in f], dtype=np.int64)
    pair_true = np.array([r.severity[key] for r, f in zip(refs, fields) for key, _ in f], dtype=np.int64)
    return pair_ref, pair_field, pair_true


def _box_array(boxes: Sequence[Optional[list[int]]]) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 6)`` int boxes (zeros where None) and the ``(N,)`` has-box mask."""
    has = np.array([b is not None for b in boxes], dtype=bool)
    arr = np.zeros((len(boxes), 6), dtype=np.int64)
    present = [b for b in boxes if b is not None]
    # fromiter over the flat values is several times faster than np.array on a list of lists
    arr[has] = np.fromiter(chain.from_iterable(present), dtype=np.int64, count=6 * len(present)).reshape(-1, 6)
    return arr, has


def _ious(true: np.ndarray, pred: np.ndarray, valid: np.ndarray) -> np.ndarray:
    iou = np.zeros(len(true), dtype=np.float64)
    if valid.any():
        iou[valid] = iou_3d(true[valid], pred[valid])
    return iou


BREAKDOWNS = {"by_category": lambda q: q.category, "by_structure": lambda q: q.structure,
              "by_compartment": lambda q: q.compartment or "none"}
"""Report breakdowns: the question attribute each groups references by (compartment None -> "none")."""


def _breakdowns(a: ScoreArrays, qid: np.ndarray) -> dict[str, dict]:
    """``{"by_category": {value: {metric..., "n"}}, ...}``; values in schema order, absent ones left out."""
    schema = load_schema()
    out = {}
    for name, attr in BREAKDOWNS.items():
        values = list(dict.fromkeys(attr(q) for q in schema.values()))
        code_of_qid = np.zeros(max(schema) + 1, dtype=np.int64)
        for q in schema.values():
            code_of_qid[q.question_id] = values.index(attr(q))
        codes = code_of_qid[qid]
        table = {}
        for k in np.unique(codes):
            mask = codes == k
            metrics, _ = summarize(a, mask)
            table[values[k]] = {**metrics, "n": int(mask.sum())}
        out[name] = table
    return out


def _model_arrays(parsed: Sequence[ParsedOutput], truth: tuple[np.ndarray, ...], box_true: np.ndarray,
                  has_box: np.ndarray, idx: _SchemaIndex) -> ScoreArrays:
    """The model's parsed answers as ``ScoreArrays`` (pairs in reference then schema field order)."""
    pair_ref, pair_field, pair_true = truth
    # The parser returns every field in schema order, so the flattened grades line up with the pairs.
    pair_pred = np.fromiter((MISSING if g is None else g for p in parsed for g in p.severity.values()),
                            dtype=np.int64, count=pair_ref.size)
    box_pred, box_found = _box_array([p.box for p in parsed])
    return ScoreArrays(pair_ref, idx.field_group[pair_field], pair_true, pair_pred, idx.field_ordinal[pair_field],
                       has_box, _ious(box_true, box_pred, has_box & box_found),
                       np.array([p.severity_found for p in parsed], dtype=bool), box_found, box_pred)


def _majority_arrays(source: Optional[Sequence[Reference]], model: ScoreArrays, pair_field: np.ndarray,
                     qid: np.ndarray, box_true: np.ndarray, idx: _SchemaIndex) -> ScoreArrays:
    """The majority baseline (grades and boxes learnt from ``source``, or from the scored references when
    None) answering the scored references."""
    if source is None:
        src_field, src_true, src_box, src_has, src_qid = pair_field, model.pair_true, box_true, model.has_box, qid
    else:
        _, src_field, src_true = _pairs(source, idx)
        src_box, src_has = _box_array([r.box for r in source])
        src_qid = np.array([r.question_id for r in source], dtype=np.int64)
    maj_grade = majority_grades(src_field, src_true, len(idx.field_group))
    boxes, box_found = _majority_box_lookup(src_qid[src_has], src_box[src_has], qid, idx.num_questions)
    pair_pred = maj_grade[pair_field]
    n = len(qid)
    sev_found = np.bincount(model.pair_ref, weights=pair_pred != MISSING, minlength=n) > 0
    return ScoreArrays(model.pair_ref, model.pair_group, model.pair_true, pair_pred, model.pair_ordinal,
                       model.has_box, _ious(box_true, boxes, model.has_box & box_found), sev_found,
                       box_found, boxes)


def _majority_box_lookup(src_key: np.ndarray, src_box: np.ndarray, key: np.ndarray,
                         num_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """``metrics.majority_boxes`` learnt from ``src_key`` / ``src_box`` (ids below ``num_keys``), answered for each
    of ``key``: ``(N, 6)`` boxes (zeros where the source never saw the key) and the ``(N,)`` found mask."""
    box_of = np.zeros((num_keys, 6), dtype=np.int64)
    has = np.zeros(num_keys, dtype=bool)
    for k, box in majority_boxes(src_key, src_box).items():
        box_of[k], has[k] = box, True
    return box_of[key], has[key]


def _box_errors(a: ScoreArrays, box_true: np.ndarray, box_group: np.ndarray) -> dict:
    """``metrics.box_axis_errors`` over the references with a box that ``a`` answered with one; ``box_group``:
    the reference groups whose volumes are compared (question type, or question type and knee side)."""
    both = a.has_box & a.box_found
    return box_axis_errors(box_true[both], a.box_pred[both], box_group[both], AXIS_NAMES)


def _knee_sides(refs: Sequence[Reference]) -> Optional[np.ndarray]:
    """0 (right) / 1 (left) per reference from its ``volume_id`` (``..._left`` / ``..._right``, the release's
    names); None when some reference's id names no side."""
    side_of = {vid: side_of_file_name(vid) for vid in {r.volume_id for r in refs}}  # ~60 questions per volume
    if None in side_of.values():
        return None
    return np.array([side_of[r.volume_id] == "left" for r in refs], dtype=np.int64)


def _side_majority_boxes(source: Optional[Sequence[Reference]], sides: Optional[np.ndarray], key: np.ndarray,
                         box_true: np.ndarray, has_box: np.ndarray) -> Optional[dict]:
    """The majority box per (question, knee side): what a model gets that writes one box per question in each
    side's frame, without looking at the image. Left and right knees put medial and lateral at opposite ends
    of the slice axis, so a side-blind median box sits between the two. ``source``: where the boxes are learnt
    (None: the scored references, ``key`` = question id * 2 + ``sides`` of each). Box metrics and per-axis
    errors, or None when a volume_id names no side."""
    src_side = sides if source is None else _knee_sides(source)
    if sides is None or src_side is None:
        return None
    if source is None:
        src_key, src_box, src_has = key, box_true, has_box
    else:
        src_key = np.array([r.question_id for r in source], dtype=np.int64) * 2 + src_side
        src_box, src_has = _box_array([r.box for r in source])
    num_keys = int(max(src_key.max(initial=0), key.max(initial=0))) + 1
    boxes, box_found = _majority_box_lookup(src_key[src_has], src_box[src_has], key, num_keys)
    box_found &= has_box
    iou = _ious(box_true, boxes, box_found)[has_box]
    return {"miou": miou(iou), "acc_iou25": acc_iou(iou, 0.25), "acc_iou50": acc_iou(iou, 0.5),
            "box_errors": box_axis_errors(box_true[box_found], boxes[box_found], key[box_found], AXIS_NAMES)}


def _confusion(model: ScoreArrays, idx: _SchemaIndex) -> dict[str, dict]:
    """Confusion matrix of every (category, field key) group graded 0-3 that the references contain."""
    out = {}
    for g in np.unique(model.pair_group[model.pair_ordinal]):
        sel = model.pair_group == g
        category, key = idx.groups[int(g)]
        out[f"{category} / {key}"] = {
            "labels": [*map(str, ORDINAL_GRADES), "missing"],
            "matrix": confusion_matrix(model.pair_true[sel], model.pair_pred[sel], len(ORDINAL_GRADES)).tolist(),
        }
    return out


def score_predictions(outputs: Mapping[str, Optional[str]], references: Sequence[Reference],
                      majority_references: Optional[Sequence[Reference]] = None,
                      prediction_issues: Optional[Predictions] = None) -> ScoreResult:
    """Score raw outputs (sample id -> text) against references.

    The majority baseline is learnt from ``majority_references`` (a train split) or, when None, from
    ``references`` themselves. ``prediction_issues`` (``read_predictions``) adds the file's problems to
    the report; outputs whose sample id is not a reference are counted and ignored.
    """
    schema, idx = load_schema(), _schema_index()
    n = len(references)
    has_pred = [r.sample_id in outputs for r in references]
    parsed = parse_outputs([outputs.get(r.sample_id) for r in references],
                           [schema[r.question_id] for r in references])
    truth = _pairs(references, idx)
    box_true, has_box = _box_array([r.box for r in references])
    qid = np.array([r.question_id for r in references], dtype=np.int64)
    model = _model_arrays(parsed, truth, box_true, has_box, idx)
    majority = _majority_arrays(majority_references, model, truth[1], qid, box_true, idx)
    overall, support = summarize(model)
    # Box errors compare volumes of one question type and one knee side (when the volume ids name it): left
    # and right knees put the same region at opposite ends of the slice axis, which says nothing of localization.
    sides = _knee_sides(references)
    box_group = qid if sides is None else qid * 2 + sides

    preds = prediction_issues or Predictions()
    known = {r.sample_id for r in references}
    unknown = [sid for sid in outputs if sid not in known]
    issues = list(preds.issues)
    for sid in unknown[:max(0, MAX_ISSUES_LISTED - len(issues))]:
        where = f"{preds.source}:{preds.line_of[sid]}: " if sid in preds.line_of else ""
        issues.append(f"{where}sample_id {sid!r} is not in the references; ignored")
    n_pred = sum(has_pred)
    counts = {
        "references": n,
        "references_with_box": int(has_box.sum()),
        "field_pairs": int(model.pair_ref.size),
        "prediction_lines": preds.lines or len(outputs),
        "predictions_scored": n_pred,
        "missing_predictions": n - n_pred,
        "unknown_predictions": len(unknown),
        "duplicate_predictions": preds.duplicates,
        "malformed_prediction_lines": preds.malformed,
        "severity_parse_failures": int((~model.severity_found).sum()),
        "box_parse_failures": int((has_box & ~model.box_found).sum()),
        "invalid_grades": sum(p.invalid_grades for p in parsed),
        "boxes_repaired": sum(p.box_repaired for p in parsed),
        "coord_token_boxes": sum(p.coord_token_box for p in parsed),
    }
    report = {
        "bench_version": BENCH_VERSION,
        "n": n,
        "overall": overall,
        "majority_baseline": summarize(majority)[0],
        "support": support,
        **_breakdowns(model, qid),
        **{f"majority_{k}": v for k, v in _breakdowns(majority, qid).items()},
        "confusion": _confusion(model, idx),
        "box_errors": {name: _box_errors(a, box_true, box_group) for name, a in (("model", model),
                                                                                ("majority_baseline", majority))},
        "side_majority_box": _side_majority_boxes(majority_references, sides, box_group, box_true, has_box),
        "counts": counts,
        "input_issues": issues,
        "majority_source": ("the scored references themselves" if majority_references is None
                            else "majority references given by the caller"),
        "per_sample": "per_sample.jsonl",
    }

    correct = np.bincount(model.pair_ref, weights=model.pair_true == model.pair_pred,
                          minlength=n).astype(np.int64).tolist()
    # The truth is left out: it is in the references file under the same sample_id, and repeating the
    # long field names would double the file and its writing time.
    per_sample = [
        {"sample_id": ref.sample_id, "question_id": ref.question_id, "has_prediction": has_p,
         "severity_found": p.severity_found, "predicted_severity": p.severity, "invalid_grades": p.invalid_grades,
         "fields_correct": k, "exact": k == len(ref.severity), "predicted_box": p.box,
         "box_repaired": p.box_repaired, "coord_token_box": p.coord_token_box,
         "iou": v if ref.box is not None else None}
        for ref, p, has_p, k, v in zip(references, parsed, has_pred, correct, model.iou.tolist())]
    return ScoreResult(report, per_sample, model.iou[has_box], majority.iou[has_box])


def score_files(predictions: str | os.PathLike, references: str | os.PathLike, out_dir: str | os.PathLike,
                majority_source: Optional[str | os.PathLike] = None, plots: bool = True) -> dict:
    """``reasonknee3d score``: read both files, score, write the report folder; returns the report dict.

    Raises ``ScoreInputError`` for bad references or majority source; prediction problems are reported.
    """
    from .report import PlotWorker, write_report

    # The plot process starts first so its matplotlib import overlaps the reading and parsing.
    with _without_cyclic_gc(), (PlotWorker() if plots else contextlib.nullcontext()) as plotter:
        refs = read_references(references)
        majority_refs = read_references(majority_source) if majority_source is not None else None
        preds = read_predictions(predictions)
        result = score_predictions(preds.outputs, refs, majority_refs, prediction_issues=preds)
        result.report["majority_source"] = (
            str(majority_source) if majority_source is not None
            else f"{references} (no --majority-source: the baseline is computed on the scored references themselves)")
        result.report["inputs"] = {"predictions": str(predictions), "references": str(references)}
        write_report(out_dir, result, plots=plots, plotter=plotter)
    return result.report


@contextlib.contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: scoring creates about ten objects per reference that all live
    until the report is written, and the collector would rescan them again and again (about a third of
    the run time at 100k references). Reference counting still frees the acyclic data; the few cycles
    (matplotlib figures) are collected once the collector is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
