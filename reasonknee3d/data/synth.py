"""Synthetic 3DReasonKnee release: knee phantoms written in the real release layout.

``write_synthetic_release(out, n_volumes, shape, seed)`` (CLI: ``reasonknee3d synth``) writes, from
nothing, what the public release plus the user's OAI conversion provide:

- ``images/<pid>/<time>/<study>_<series>_<side>.nii.gz`` (int16, sagittal DESS-like phantoms) and
  ``masks/knee_NNN.nii.gz`` (uint8 nnU-Net-style labels), same shape and affine;
- ``data/split_files/{train,val,test}_split.csv`` with the real columns, patient-disjoint, some patients
  scanned at two timepoints;
- ``data/question_files/``: questions, question_subregion_mapping, cot_question_mapping, grade_dict, labels,
  and under the release's names ``questions_nobbox_zeroshot.json`` / ``questions_nobbox_guided.json``
  (``{"1": text, ..., "69": text}``, answers asked in the release's JSON wrappers);
- ``data/generate_data/{train,val,test,test_balanced}.json``: one item per (volume, question) with
  ``image``, ``prompt``, ``answer``, ``final_diagnosis`` and, unlike the public release, ``question_id`` and
  ``box`` (from the mask and the question's labels).

Grades are imbalanced like the real data (grade 0 most common), yet every grade of every field occurs
once the release has at least 9 volumes (9 = the morphology codes). Everything is deterministic by seed.
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import nibabel as nib
import numpy as np

from ..answer import check_severity, format_answer
from ..io_utils import OUTPUT_MARKER, atomic_dir, atomic_open, atomic_path, check_output_dir, write_json, write_output_marker
from ..moaks import NO_TEAR
from ..prompts import (RELEASE_QUESTION_FILES, grade_description, question_prompt, reasoning_steps,
                       reasoning_template, release_question_text)
from ..schema import QuestionSpec, load_schema
from .phantom import (LabelsLostError, Phantom, follow_up, label_boxes, label_names, question_labels, render_phantom,
                      sample_anatomy)

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
"""Share of patients per split (val and test get at least one patient when there are three or more)."""
CSV_COLUMNS = ("patient_id", "time", "study_folder", "series_folder", "knee_side", "path", "image_filepath",
               "label_filepath")
MIN_SHAPE = (16, 32, 32)
"""Smallest (S, H, W) at which the thinnest labelled structures (meniscal roots, bursae) still get voxels."""
REPOSITION_TRIES = 5
"""Scans whose pose pushed a labelled structure out of view are repositioned, as a technologist would."""
FOLLOW_UP_RATE = 0.3
"""Share of patients scanned at a second timepoint."""

# Grade distributions per category (index = grade of the first field). Abnormal findings are the minority,
# as in the real data, where always answering the majority grade scores about 0.72.
_GRADE_WEIGHTS: dict[str, tuple[float, ...]] = {
    "bone_marrow_lesion": (0.72, 0.15, 0.09, 0.04),
    "cartilage": (0.66, 0.17, 0.11, 0.06),
    "osteophyte": (0.64, 0.22, 0.09, 0.05),
    "hoffa_synovitis": (0.55, 0.3, 0.11, 0.04),
    "effusion_synovitis": (0.5, 0.3, 0.14, 0.06),
    "meniscal_extrusion": (0.7, 0.16, 0.09, 0.05),
    "meniscal_morphology": (0.72, 0.06, 0.03, 0.06, 0.03, 0.04, 0.03, 0.02, 0.01),
}
_PRESENCE_RATE: dict[str, float] = {
    "meniscal_cyst": 0.08, "meniscal_hypertrophy": 0.06, "meniscal_root_tear": 0.08, "periarticular": 0.1,
    "Complete Tear": 0.06, "Associated with BML/cyst at site of insertion or origin": 0.1, "ACL Repair": 0.04,
    "Signal Abnormality": 0.1,
}


@dataclass(frozen=True)
class VolumePlan:
    """Identity of one synthetic scan in the release."""
    index: int
    patient_index: int
    patient_id: str
    time: str
    study_folder: str
    series_folder: str
    knee_side: str
    split: str
    mask_digits: int

    @property
    def image_filepath(self) -> str:
        return f"images/{self.patient_id}/{self.time}/{self.study_folder}_{self.series_folder}_{self.knee_side}.nii.gz"

    @property
    def label_filepath(self) -> str:
        return f"masks/knee_{self.index:0{self.mask_digits}d}.nii.gz"

    def csv_row(self) -> dict[str, str]:
        return {"patient_id": self.patient_id, "time": self.time, "study_folder": self.study_folder,
                "series_folder": self.series_folder, "knee_side": self.knee_side,
                "path": f"{self.patient_id}/{self.time}/{self.study_folder}/{self.series_folder}",
                "image_filepath": self.image_filepath, "label_filepath": self.label_filepath}


@dataclass
class SynthSummary:
    """What ``write_synthetic_release`` wrote."""
    out: Path
    shape: tuple[int, int, int]
    seed: int
    volumes: dict[str, int]
    items: dict[str, int]
    """Items per generate_data file (train, val, test, test_balanced)."""
    files: int
    bytes_on_disk: int
    seconds: float

    def __str__(self) -> str:
        vols = ", ".join(f"{s} {n}" for s, n in self.volumes.items())
        items = ", ".join(f"{s} {n}" for s, n in self.items.items())
        return (f"synthetic release in {self.out}: shape {self.shape}, seed {self.seed}\n"
                f"  volumes: {vols}\n  items: {items}\n"
                f"  {self.files} files, {self.bytes_on_disk / 2 ** 20:.1f} MiB on disk, {self.seconds:.1f} s")


def plan_volumes(n_volumes: int, rng: np.random.Generator) -> list[VolumePlan]:
    """Patients (some with a follow-up scan), knee sides, OAI-like folder names and patient-disjoint splits."""
    if n_volumes < 1:
        raise ValueError(f"n_volumes={n_volumes}: a release needs at least one volume")
    visits: list[int] = []
    left = n_volumes
    while left:
        visits.append(2 if left >= 2 and rng.random() < FOLLOW_UP_RATE else 1)
        left -= visits[-1]
    n_pat = len(visits)
    splits = np.full(n_pat, "train", dtype=object)
    if n_pat >= 3:
        order = rng.permutation(n_pat)
        n_test = max(1, round(SPLIT_FRACTIONS["test"] * n_pat))
        n_val = max(1, round(SPLIT_FRACTIONS["val"] * n_pat))
        splits[order[:n_test]] = "test"
        splits[order[n_test:n_test + n_val]] = "val"
    patient_ids = 9_000_000 + rng.choice(1_000_000, size=n_pat, replace=False)
    series = 10_000_000 + rng.choice(90_000_000, size=n_volumes, replace=False)
    digits = max(3, len(str(n_volumes - 1)))
    plans, index = [], 0
    for p, n_visits in enumerate(visits):
        side = "right" if rng.random() < 0.5 else "left"
        year, month, day = int(rng.integers(2004, 2007)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
        months = [0] + sorted(rng.choice([12, 24, 36, 48], size=n_visits - 1, replace=False).tolist())
        for m in months:
            y, mo = year + (month - 1 + m) // 12, (month - 1 + m) % 12 + 1
            plans.append(VolumePlan(index=index, patient_index=p, patient_id=str(patient_ids[p]), time=f"{m:02d}m",
                                    study_folder=f"{y:04d}{mo:02d}{day:02d}", series_folder=str(series[index]),
                                    knee_side=side, split=str(splits[p]), mask_digits=digits))
            index += 1
    return plans


def _draw(rng: np.random.Generator, weights: Sequence[float]) -> int:
    """Index drawn with probability proportional to ``weights``."""
    cdf = np.cumsum(weights)
    return int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))


def sample_severity(spec: QuestionSpec, rng: np.random.Generator) -> dict[str, int]:
    """One random, internally consistent severity of a question (a grade-0 size means no lesion at all)."""
    keys, c = spec.field_keys, spec.category
    if c in ("bone_marrow_lesion", "cartilage"):
        size = _draw(rng, _GRADE_WEIGHTS[c])
        if size == 0:
            return dict.fromkeys(keys, 0)
        if c == "cartilage":  # depth: share of the defect with full-thickness loss (0: partial thickness only)
            return {keys[0]: size, keys[1]: _draw(rng, (0.35, 0.25, 0.25, 0.15))}
        return {keys[0]: size, keys[1]: 1 + _draw(rng, (0.55, 0.3, 0.15)), keys[2]: 1 + _draw(rng, (0.2, 0.3, 0.5))}
    if c in _GRADE_WEIGHTS:
        return {keys[0]: _draw(rng, _GRADE_WEIGHTS[c])}
    if c == "ligament_tendon":
        return {k: int(rng.random() < _PRESENCE_RATE[k]) for k in keys}
    present = int(rng.random() < _PRESENCE_RATE[c])
    if c == "meniscal_cyst":
        # A cyst usually arises from a tear (anterior horn, body, posterior horn); no cyst, no tear (3).
        tear = _draw(rng, (0.25, 0.3, 0.35, 0.1)) if present else NO_TEAR
        return {"presence": present, "tear_location": tear}
    return {keys[0]: present}


def _covering_severities(spec: QuestionSpec) -> list[dict[str, int]]:
    """Severities that together show every grade of every field: the i-th takes each field's i-th grade
    (its last grade when it has fewer). For the schema's fields these are consistent (size i, number i...)."""
    if spec.category == "meniscal_cyst":  # no cyst without a tear, then a cyst with each tear location
        return [{"presence": 0, "tear_location": NO_TEAR}] + [{"presence": 1, "tear_location": t}
                                                                 for t in range(NO_TEAR)]
    n = max(len(f.grades) for f in spec.fields)
    return [{f.key: f.grades[min(i, len(f.grades) - 1)] for f in spec.fields} for i in range(n)]


def sample_severities(n_volumes: int, rng: np.random.Generator) -> list[dict[int, dict[str, int]]]:
    """Severity of every question for every volume: random draws, except that each question's covering
    severities are placed on distinct random volumes so every grade occurs (as far as volumes allow)."""
    schema = load_schema()
    out: list[dict[int, dict[str, int]]] = [{} for _ in range(n_volumes)]
    for qid, spec in schema.items():
        for v in range(n_volumes):
            out[v][qid] = sample_severity(spec, rng)
        cover = _covering_severities(spec)
        for v, sev in zip(rng.permutation(n_volumes), cover):
            out[int(v)][qid] = sev
    return out


def balanced_subset(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items with each question's grades as balanced as the items allow: per question, the same number of
    items for every grade of its first field present (the count of the rarest one; a single item when only
    one grade is present), in item order."""
    by_question: dict[int, dict[int, list[int]]] = {}
    for i, item in enumerate(items):
        spec = load_schema()[item["question_id"]]
        grade = item["final_diagnosis"][spec.finding_key][spec.fields[0].key]
        by_question.setdefault(item["question_id"], {}).setdefault(grade, []).append(i)
    keep: list[int] = []
    for groups in by_question.values():
        n = min(len(g) for g in groups.values()) if len(groups) > 1 else 1
        keep += [i for g in groups.values() for i in g[:n]]
    return [items[i] for i in sorted(keep)]


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> int:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path.stat().st_size


def _items(plan: VolumePlan, phantom: Phantom, severities: dict[int, dict[str, int]],
           qids: Iterable[int]) -> list[dict[str, Any]]:
    boxes = label_boxes(phantom.labels)
    items = []
    for qid in qids:
        spec = load_schema()[qid]
        sev = check_severity(spec, severities[qid], where=f"volume {plan.index} question {qid}")
        box = phantom.question_box(qid, boxes)
        items.append({"image": plan.image_filepath, "question_id": qid, "prompt": question_prompt(spec),
                      "answer": format_answer(spec, reasoning_steps(spec, sev), box, sev),
                      "final_diagnosis": {spec.finding_key: sev}, "box": box})
    return items


def _write_question_files(root: Path, qids: Sequence[int]) -> int:
    schema = load_schema()
    files = {
        "questions.json": {str(q): question_prompt(schema[q]) for q in qids},
        "question_subregion_mapping.json": {str(q): list(question_labels(q)) for q in qids},
        "cot_question_mapping.json": {str(q): {f: {str(g): steps for g, steps in grades.items()}
                                               for f, grades in reasoning_template(schema[q]).items()}
                                      for q in qids},
        "grade_dict.json": {str(q): {f.key: {str(g): grade_description(schema[q], f.key, g) for g in f.grades}
                                     for f in schema[q].fields} for q in qids},
        "labels.json": {str(i): name for i, name in label_names().items()},
        # The release's own question files: the zero-shot and guided texts, keyed "1".."69".
        **{name: {str(q): release_question_text(schema[q], style) for q in qids}
           for style, name in RELEASE_QUESTION_FILES.items()},
    }
    size = 0
    for name, obj in files.items():
        write_json(root / name, obj)
        size += (root / name).stat().st_size
    return size


def write_synthetic_release(out: Path, n_volumes: int, shape: tuple[int, int, int], seed: int,
                            questions: Optional[Sequence[int]] = None, overwrite: bool = False) -> SynthSummary:
    """Write a synthetic release of ``n_volumes`` phantoms of ``shape`` (S, H, W) under ``out``.

    ``questions`` restricts the question ids that get items (all 69 by default; the phantoms are the same
    either way). ``out`` must be new or empty, or hold an earlier synthetic release (its
    ``io_utils.OUTPUT_MARKER``) and ``overwrite`` be set; anything else raises ``io_utils.OutputDirError``.
    The release is written into a temporary sibling folder and renamed into place when complete, so a failed
    run (full disk, error, interrupt) leaves ``out`` as it was and nothing that blocks the rerun.
    """
    t0 = time.perf_counter()
    out = Path(out)
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or any(s < m for s, m in zip(shape, MIN_SHAPE)):
        raise ValueError(f"shape {shape}: expected three sizes (S, H, W) of at least {MIN_SHAPE}: coarser voxels "
                         f"lose the thinnest labelled structures (meniscal roots, bursae)")
    schema = load_schema()
    qids = sorted(schema) if questions is None else sorted({int(q) for q in questions})
    unknown = [q for q in qids if q not in schema]
    if unknown or not qids:
        raise ValueError(f"questions {list(questions or [])}: unknown ids {unknown}; expected ids in "
                         f"{min(schema)}..{max(schema)}")
    settings = {"volumes": n_volumes, "shape": list(shape), "seed": seed,
                "questions": "all" if questions is None else qids}
    check_output_dir(out, "synth", overwrite, settings)
    with atomic_dir(out) as tmp:
        summary = _write_release(tmp, n_volumes, shape, seed, qids, schema)  # type: ignore[arg-type]
        write_output_marker(tmp, "synth", settings)
        marker_bytes = (tmp / OUTPUT_MARKER).stat().st_size
    return replace(summary, out=out, files=summary.files + 1, bytes_on_disk=summary.bytes_on_disk + marker_bytes,
                   seconds=time.perf_counter() - t0)


def _write_release(out: Path, n_volumes: int, shape: tuple[int, int, int], seed: int, qids: Sequence[int],
                   schema: dict[int, QuestionSpec]) -> SynthSummary:
    """Write the release files under ``out`` (``write_synthetic_release`` passes its temporary folder)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, 0])
    plans = plan_volumes(n_volumes, rng)
    severities = sample_severities(n_volumes, rng)
    anatomies: dict[int, Any] = {}
    items: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    size, files = 0, 0
    for plan in plans:
        vrng = np.random.default_rng([seed, 1, plan.index])
        if plan.patient_index in anatomies:
            anatomy = follow_up(anatomies[plan.patient_index], vrng)
        else:
            anatomy = sample_anatomy(np.random.default_rng([seed, 2, plan.patient_index]), side=plan.knee_side)
            anatomies[plan.patient_index] = anatomy
        sev = {q: severities[plan.index][q] if q in qids else {} for q in schema}
        for attempt in range(REPOSITION_TRIES):
            try:
                phantom = render_phantom(shape, anatomy, sev, vrng)
                break
            except LabelsLostError:
                if attempt == REPOSITION_TRIES - 1:
                    raise
                anatomy = follow_up(anatomy, vrng)
        size += _save_nifti(out / plan.image_filepath, phantom.image, phantom.affine)
        size += _save_nifti(out / plan.label_filepath, phantom.labels, phantom.affine)
        items[plan.split] += _items(plan, phantom, severities[plan.index], qids)
        files += 2

    data = out / "data"
    for split in SPLITS:
        path = data / "split_files" / f"{split}_split.csv"
        with atomic_open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS))
            writer.writeheader()
            writer.writerows(p.csv_row() for p in plans if p.split == split)
        size += path.stat().st_size
    generated = {**items, "test_balanced": balanced_subset(items["test"])}
    for name, rows in generated.items():
        path = data / "generate_data" / f"{name}.json"
        write_json(path, rows)
        size += path.stat().st_size
    size += _write_question_files(data / "question_files", qids)
    files += len(SPLITS) + len(generated) + 5 + len(RELEASE_QUESTION_FILES)
    return SynthSummary(out=out, shape=shape, seed=seed,  # type: ignore[arg-type]
                        volumes={s: sum(p.split == s for p in plans) for s in SPLITS},
                        items={n: len(r) for n, r in generated.items()}, seconds=time.perf_counter() - t0,
                        bytes_on_disk=size, files=files)
