"""Turn one raw model output into a severity answer and a box (docs/benchmark.md, "Parsing an answer").

The parser never raises on any string: whatever it cannot read becomes a missing field or a missing box,
and the ``ParsedOutput`` says which, so the scorer can count every failure. It reads

* the package's own format (``Location: <|box_start|>[...]<|box_end|>`` / ``Final diagnosis: {...}``),
  checked first because it is what trained models write;
* zero-shot outputs: JSON anywhere in prose or code fences (the last object that names this question's
  finding or fields counts), Python-literal quoting, ``MOAKS_scores`` / ``MOAKS_grade`` /
  ``Final diagnosis`` wrappers, key spelling variants, grades as strings, boxes under any key containing
  "box", or a bare ``[n, n, n, n, n, n]`` list.

Only the last ``MAX_CHARS`` characters of an output are read: the answer sits at the end, and the cap
bounds the cost of pathological inputs.
"""
from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .boxes import repair_boxes
from .constants import BOX_END, BOX_START, COORD_TOKEN_FORMAT, DIAGNOSIS_PREFIX
from .schema import QuestionSpec

MAX_CHARS = 32_768
"""Characters read from the end of an output."""
MAX_OBJECT_STARTS = 256
"""Opening braces tried when scanning an output for JSON objects."""
MAX_LITERAL_CHARS = 8_192
"""Longest brace-balanced span handed to ``ast.literal_eval`` (Python-literal quoting)."""
MAX_LITERAL_TRIES = 16
"""Python-literal attempts per output: each one scans the rest of the text for the closing brace."""
MAX_MEMO_TAIL = 1_024
"""Longest "Final diagnosis: ..." tail kept in the per-question memo (bounds its memory)."""
MAX_ABS_COORD = 1_000_000
"""Box coordinates beyond this are rejected: no volume is that large, and int64 box volumes stay exact."""

_DECODER = json.JSONDecoder()
_NORM_RE = re.compile(r"[\s_\-]+")
_INT_RE = re.compile(r"[+-]?\d+")
_NUM = r"[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?"
_NUM_RE = re.compile(_NUM)
_BOX_SPAN_RE = re.compile(re.escape(BOX_START) + r"(.*?)" + re.escape(BOX_END), re.DOTALL)
_BARE_BOX_RE = re.compile(r"\[\s*" + r"\s*,\s*".join([f"({_NUM})"] * 6) + r"\s*\]")
# Six non-negative ints of at most 6 digits: always inside MAX_ABS_COORD, so no further checks.
_FAST_BOX_RE = re.compile(re.escape(BOX_START) + r"\[\s*" + r"\s*,\s*".join([r"(\d{1,6})"] * 6)
                          + r"\s*\]" + re.escape(BOX_END))
_NO_FAST_PATH = object()
_COORD_PREFIX = COORD_TOKEN_FORMAT.split("{", 1)[0]
# Strings (either quote style) are skipped so braces inside them do not count.
_BRACE_TOKEN_RE = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|[{}]')
_WRAPPERS = ("moaksscores", "moaksgrade", "finaldiagnosis")


_NORM_MEMO: dict[str, str] = {}


def _norm(key: str) -> str:
    """Key spelling that ignores case, spaces, underscores and hyphens (memoized: keys repeat a lot)."""
    out = _NORM_MEMO.get(key)
    if out is None:
        if len(_NORM_MEMO) > 100_000:  # outputs may invent endless keys; keep the memo bounded
            _NORM_MEMO.clear()
        out = _NORM_MEMO[key] = _NORM_RE.sub("", key.lower())
    return out


@dataclass(slots=True)
class ParsedOutput:
    """What the parser read from one output; every field has a defined value for any input."""

    severity: dict[str, Optional[int]]
    """Every field key of the question -> the predicted grade, or None when missing/invalid."""
    box: Optional[list[int]] = None
    """Predicted box in the package's box convention (min <= max per axis after repair), or None."""
    box_repaired: bool = False
    """The box had min > max on some axis and was repaired by swapping."""
    severity_found: bool = False
    """Some field of this question (or a bare grade under its finding key) was located in the output."""
    invalid_grades: int = 0
    """Located fields whose value was not an integer grade in the field's range."""
    coord_token_box: bool = False
    """The box was written as undecoded coordinate tokens (no volume shape here), so it counts as missing."""


@dataclass(frozen=True)
class _Lookup:
    """Normalized keys of one question, built once per question id."""

    spec: QuestionSpec
    finding: str
    fields: dict[str, str] = field(default_factory=dict)
    """normalized field key -> schema field key"""
    grades: dict[str, frozenset[int]] = field(default_factory=dict)
    field_keys: tuple[str, ...] = ()
    memo: dict[str, Any] = field(default_factory=dict)
    """fast-path cache: text from "Final diagnosis:" on -> ``_fast_severity`` result"""


_LOOKUPS: dict[int, _Lookup] = {}


def _lookup(spec: QuestionSpec) -> _Lookup:
    lut = _LOOKUPS.get(spec.question_id)
    if lut is None or lut.spec is not spec:
        lut = _Lookup(spec, _norm(spec.finding_key), {_norm(f.key): f.key for f in spec.fields},
                      {f.key: frozenset(f.grades) for f in spec.fields}, spec.field_keys)
        _LOOKUPS[spec.question_id] = lut
    return lut


def _grade(value: Any, allowed: frozenset[int]) -> Optional[int]:
    """An integer grade inside ``allowed`` (ints, integral floats, integer strings), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        g = value
    elif isinstance(value, float) and value.is_integer():
        g = int(value)
    elif isinstance(value, str) and len(value) < 32 and _INT_RE.fullmatch(value.strip()):
        g = int(value.strip())
    else:
        return None
    return g if g in allowed else None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str))


def _located_fields(obj: Any, lut: _Lookup, depth: int = 0) -> Optional[dict[str, Any]]:
    """Raw values of this question's fields found in a parsed object; None when nothing matches.

    Looks under the finding key, then inside wrappers, then at flat field keys. A bare value under the
    finding key (or a wrapper) fills a single-field question.
    """
    if not isinstance(obj, dict) or depth > 4:
        return None
    normed = {_norm(k): v for k, v in obj.items() if isinstance(k, str)}
    single = len(lut.spec.fields) == 1
    for key in (lut.finding, *_WRAPPERS):
        if key not in normed:
            continue
        value = normed[key]
        if isinstance(value, dict):
            found = _located_fields(value, lut, depth + 1)
            if found is not None:
                return found
        elif single and _is_scalar(value):
            return {lut.spec.fields[0].key: value}
    found = {lut.fields[k]: v for k, v in normed.items() if k in lut.fields}
    return found or None


def _brace_end(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``start`` (quotes respected), or -1."""
    depth = 0
    for m in _BRACE_TOKEN_RE.finditer(text, start):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def _objects(text: str) -> list[dict]:
    """Outermost JSON (or Python-literal) objects in ``text``, in order of appearance."""
    out: list[dict] = []
    i = text.find("{")
    tries = literal_tries = 0
    while i != -1 and tries < MAX_OBJECT_STARTS:
        tries += 1
        try:
            obj, end = _DECODER.raw_decode(text, i)
            out.append(obj)
            i = text.find("{", end)
            continue
        except ValueError:
            pass
        except RecursionError:  # nesting deeper than any answer: every later start would recurse as deep
            break
        # Not JSON: maybe Python-literal quoting ({'key': 1}) or trailing commas.
        literal_tries += 1
        j = _brace_end(text, i) if literal_tries <= MAX_LITERAL_TRIES else -1
        if j != -1 and j - i < MAX_LITERAL_CHARS:
            try:
                obj = ast.literal_eval(text[i:j + 1])
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                obj = None
            if isinstance(obj, dict):
                out.append(obj)
                i = text.find("{", j + 1)
                continue
        i = text.find("{", i + 1)
    return out


def _number(value: Any) -> Optional[float | int]:
    """A finite, plausible coordinate from a JSON value (or a number string), else None."""
    if type(value) is int:  # the common case first; bool is excluded because type(True) is bool
        return value if -MAX_ABS_COORD <= value <= MAX_ABS_COORD else None
    if isinstance(value, str):
        value = _text_number(value.strip())
    if type(value) in (int, float) and math.isfinite(value) and abs(value) <= MAX_ABS_COORD:
        return value
    return None


def _six_numbers(values: Sequence[Any]) -> Optional[list[float | int]]:
    if len(values) != 6:
        return None
    nums = [_number(v) for v in values]
    return None if any(v is None for v in nums) else nums  # type: ignore[return-value]


def _text_number(s: str) -> Optional[float | int]:
    """A number string as int (exact) or float; None when malformed or absurdly long.

    The length check keeps ``int()`` below Python's digit limit, which would raise.
    """
    if len(s) > 32 or not _NUM_RE.fullmatch(s):
        return None
    return int(s) if _INT_RE.fullmatch(s) else float(s)


def _text_numbers(strings: Sequence[str]) -> Optional[list[float | int]]:
    """Six coordinates from strings matched by ``_NUM_RE`` (digits-only strings take the quick int path)."""
    return _six_numbers([int(s) if s.isdigit() and len(s) < 16 else _text_number(s) for s in strings])


def _json_box(obj: Any, depth: int = 0) -> Optional[list[float | int]]:
    """Six numbers under the first key containing "box" (searched depth-first), else None."""
    if depth > 4:
        return None
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and "box" in key.lower() and isinstance(value, (list, tuple)):
                # Accept [a, ..., f] and [[a, ..., f], ...] (a list of boxes: the first counts).
                if value and isinstance(value[0], (list, tuple)):
                    value = value[0]
                box = _six_numbers(value)
                if box is not None:
                    return box
        for value in obj.values():
            box = _json_box(value, depth + 1)
            if box is not None:
                return box
    elif isinstance(obj, (list, tuple)):
        for value in obj[:16]:
            box = _json_box(value, depth + 1)
            if box is not None:
                return box
    return None


def _severity(located: Optional[dict[str, Any]], lut: _Lookup) -> tuple[dict[str, Optional[int]], int]:
    """Grades of every field from the located raw values, and how many located values were invalid."""
    severity: dict[str, Optional[int]] = {}
    invalid = 0
    for key in lut.field_keys:
        if located is not None and key in located:
            severity[key] = g = _grade(located[key], lut.grades[key])
            invalid += g is None
        else:
            severity[key] = None
    return severity, invalid


def _fast_severity(tail: str, lut: _Lookup) -> Any:
    """(severity, invalid count) from ``Final diagnosis: {...}`` when that object is the last one in the
    text and names this question; ``_NO_FAST_PATH`` otherwise (the general search decides)."""
    b = tail.find("{")
    if b == -1:
        return _NO_FAST_PATH
    try:
        obj, end = _DECODER.raw_decode(tail, b)
    except (ValueError, RecursionError):
        return _NO_FAST_PATH
    located = _located_fields(obj, lut) if tail.find("{", end) == -1 else None
    return _NO_FAST_PATH if located is None else _severity(located, lut)


def _parse_one(text: Any, lut: _Lookup) -> tuple[ParsedOutput, Optional[list[float | int]]]:
    """Severity and the unrepaired box of one output."""
    if not isinstance(text, str):
        return ParsedOutput(dict.fromkeys(lut.field_keys)), None
    text = text[-MAX_CHARS:]
    objects: Optional[list[dict]] = None

    # Severity. Fast path: the package's own "Final diagnosis: {...}" line. Its result depends only on
    # the text from the prefix on, which repeats a lot across samples: memoize short tails.
    parsed = None
    p = text.rfind(DIAGNOSIS_PREFIX)
    if p != -1:
        tail = text[p:]
        hit = lut.memo.get(tail)
        if hit is None:
            hit = _fast_severity(tail, lut)
            if len(tail) <= MAX_MEMO_TAIL:
                if len(lut.memo) > 100_000:
                    lut.memo.clear()
                lut.memo[tail] = hit
        if hit is not _NO_FAST_PATH:
            parsed = ParsedOutput(dict(hit[0]), severity_found=True, invalid_grades=hit[1])
    if parsed is None:
        objects = _objects(text)
        located = None
        for obj in reversed(objects):
            located = _located_fields(obj, lut)
            if located is not None:
                break
        severity, invalid = _severity(located, lut)
        parsed = ParsedOutput(severity, severity_found=located is not None, invalid_grades=invalid)

    # Box: box tokens, else a JSON key containing "box", else the first bare list of six numbers.
    q = text.rfind(BOX_START)
    if q != -1:
        m = _FAST_BOX_RE.match(text, q)  # the package's own voxel form: six small ints
        if m is not None:
            return parsed, [int(v) for v in m.groups()]
    raw_box = None
    spans = _BOX_SPAN_RE.findall(text) if q != -1 and BOX_END in text else ()
    if spans:
        inner = spans[-1]
        if _COORD_PREFIX in inner:
            parsed.coord_token_box = True
            return parsed, None
        nums = _NUM_RE.findall(inner)
        raw_box = _text_numbers(nums) if len(nums) == 6 else None
    if raw_box is None and "box" in text.lower():
        if objects is None:
            objects = _objects(text)
        for obj in reversed(objects):
            raw_box = _json_box(obj)
            if raw_box is not None:
                break
    if raw_box is None:
        m = _BARE_BOX_RE.search(text)
        if m is not None:
            raw_box = _text_numbers(m.groups())
    return parsed, raw_box


def parse_outputs(texts: Sequence[Any], specs: Sequence[QuestionSpec]) -> list[ParsedOutput]:
    """Parse many outputs (``None`` or a non-string means no output); boxes are repaired in one batch."""
    if len(texts) != len(specs):
        raise ValueError(f"parse_outputs needs one spec per text, got {len(texts)} texts and {len(specs)} specs")
    parsed: list[ParsedOutput] = []
    with_box: list[int] = []
    raw_boxes: list[list[float | int]] = []
    for text, spec in zip(texts, specs):
        out, raw = _parse_one(text, _lookup(spec))
        if raw is not None:
            with_box.append(len(parsed))
            raw_boxes.append(raw)
        parsed.append(out)
    if raw_boxes:
        # One vectorized repair (and float rounding) for all boxes: per-box numpy calls cost ~25 us each.
        boxes, repaired = repair_boxes(np.asarray(raw_boxes, dtype=np.float64))
        for i, box, rep in zip(with_box, boxes.tolist(), repaired.tolist()):
            parsed[i].box = box
            parsed[i].box_repaired = rep
    return parsed


def parse_output(text: Any, spec: QuestionSpec) -> ParsedOutput:
    """Parse one raw model output for question ``spec``; never raises."""
    return parse_outputs([text], [spec])[0]


def json_objects(text: str) -> list[dict]:
    """The outermost JSON (or Python-literal) objects in the last ``MAX_CHARS`` characters of ``text``, in
    order of appearance: the same search the parser uses, for readers that need the objects themselves
    (the release loader reads a diagnosis written only in an answer)."""
    return _objects(text[-MAX_CHARS:]) if isinstance(text, str) else []
