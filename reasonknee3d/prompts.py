"""The project's own wording of the 69 questions, their grades and the templated reasoning steps.

One place for every sentence a model reads or is trained to write about a question: the synthetic release
(``questions.json``, ``grade_dict.json``, ``cot_question_mapping.json`` and its answers), the zero-shot
runners and training all call these functions. Wording is generated from each question's category,
structure, compartment and finding key (``schema.QuestionSpec``), never listed per question.

``release_question_text`` writes the release-format question files (``questions_nobbox_zeroshot.json`` /
``questions_nobbox_guided.json``): the same facts, answered as JSON in the release's wrappers.

Styles of ``question_prompt``:
- ``"plain"``: the question and the JSON shape of the answer (finding key, field keys, grade ranges).
- ``"guided"``: adds the grade definitions and the answer format (``answer.py``): the region, the
  ``Location:`` box line with the box convention, step-by-step reasoning, the ``Final diagnosis:`` JSON line.
"""
from __future__ import annotations

from typing import Mapping

from . import moaks
from .constants import BOX_END, BOX_START, DIAGNOSIS_PREFIX, LOCATION_PREFIX
from .schema import QuestionSpec, null_field_questions

PROMPT_STYLES = ("plain", "guided")

# What a reader looks at, per category (first reasoning step after the region).
_LOOK_FOR: dict[str, str] = {
    "bone_marrow_lesion": "Look for ill-defined hyperintense marrow signal and well-defined fluid-bright cysts "
                          "beneath the articular surface.",
    "cartilage": "Follow the bright cartilage layer and look for surface defects filled with fluid.",
    "osteophyte": "Look for a bony spur growing from the joint margin; the largest one counts, graded by how "
                  "far it protrudes.",
    "hoffa_synovitis": "Look for hyperintense signal inside the dark infrapatellar fat pad.",
    "effusion_synovitis": "Estimate the amount of bright joint fluid in the retropatellar space and the "
                          "suprapatellar bursa.",
    "meniscal_extrusion": "Compare the outer edge of the meniscus with the margin of the tibial plateau.",
    "meniscal_morphology": "Inspect the dark meniscal triangle for bright signal, clefts and missing tissue.",
    "meniscal_cyst": "Look for a fluid-bright cyst next to the outer edge of the meniscus and for the meniscal "
                     "tear it arises from.",
    "meniscal_hypertrophy": "Compare the height and width of the meniscus with a normal meniscus.",
    "meniscal_root_tear": "Follow the posterior horn to its attachment and look for a fluid-filled gap.",
    "ligament_tendon": "Follow the dark fibres from origin to insertion and inspect the attachments.",
    "periarticular": "Inspect the periarticular soft tissues at this site for fluid or abnormal signal.",
}

_LIGAMENT_NAMES = {"ACL": "anterior cruciate ligament (ACL)", "PCL": "posterior cruciate ligament (PCL)"}
MENISCUS_PARTS = {"anterior": "anterior horn", "body": "body", "posterior": "posterior horn"}
"""Meniscal segment named by a finding key word -> its anatomical name (also the phantom's label names)."""
_CATEGORY_SUFFIX = {"bone_marrow_lesion": "BML", "cartilage": "cartilage lesion", "osteophyte": "osteophyte"}


def grade_description(spec: QuestionSpec, field_key: str, grade: int) -> str:
    """Short description of ``grade`` of one field of a question (``grade_dict.json`` entries), from the
    MOAKS table in ``moaks.py``."""
    return moaks.grade_meaning(spec, field_key, grade).text


def location_words(spec: QuestionSpec) -> str:
    """Location words of a BML, cartilage or osteophyte finding key: 'femur medial trochlea BML' ->
    'medial trochlea'."""
    suffix = _CATEGORY_SUFFIX.get(spec.category)
    if suffix is None:
        raise ValueError(f"question {spec.question_id}: location words exist only for categories "
                         f"{list(_CATEGORY_SUFFIX)}, not {spec.category!r}")
    return spec.finding_key.removeprefix(spec.structure).removesuffix(suffix).strip()


def meniscus_part(spec: QuestionSpec) -> str:
    """'anterior horn' | 'body' | 'posterior horn' of a meniscal extrusion or morphology question."""
    if spec.category not in ("meniscal_extrusion", "meniscal_morphology"):
        raise ValueError(f"question {spec.question_id} ({spec.category!r}) is not about one meniscal part")
    # Extrusion keys name a direction ("medial meniscus medial extrusion"): sideways extrusion is the body's.
    return MENISCUS_PARTS.get(spec.finding_key.split()[2], "body")


def region_phrase(spec: QuestionSpec) -> str:
    """Noun phrase naming the anatomical region a question is about (also what its box encloses)."""
    c = spec.category
    if c == "bone_marrow_lesion":
        return f"the {location_words(spec)} subregion of the {spec.structure}"
    if c == "cartilage":
        return f"the {location_words(spec)} cartilage subregion of the {spec.structure}"
    if c == "osteophyte":
        return f"the {location_words(spec)} margin of the {spec.structure}"
    if c == "hoffa_synovitis":
        return "the infrapatellar (Hoffa's) fat pad"
    if c == "effusion_synovitis":
        return "the joint cavity and suprapatellar recess"
    if c in ("meniscal_extrusion", "meniscal_morphology"):
        return f"the {meniscus_part(spec)} of the {spec.compartment} meniscus"
    if c == "meniscal_cyst":
        return f"the {spec.compartment} parameniscal soft tissue"
    if c == "meniscal_hypertrophy":
        return f"the {spec.compartment} meniscus"
    if c == "meniscal_root_tear":
        return f"the posterior root of the {spec.compartment} meniscus"
    if c == "ligament_tendon":
        return "the " + _LIGAMENT_NAMES.get(spec.finding_key, spec.finding_key.replace("_", " ").lower())
    if c == "periarticular":
        return f"the site of {_finding_name(spec)}"
    raise KeyError(f"question {spec.question_id}: unknown category {c!r}")


def _finding_name(spec: QuestionSpec) -> str:
    return spec.finding_key.removesuffix("_presence").replace("_", " ")


def question_text(spec: QuestionSpec) -> str:
    """The question itself, one or two sentences."""
    c, region = spec.category, region_phrase(spec)
    if c == "bone_marrow_lesion":
        return (f"Assess bone marrow lesions (BML) in {region}: grade their size, their number and how much "
                f"of the lesion is marrow edema rather than cyst.")
    if c == "cartilage":
        return f"Assess cartilage damage in {region}: grade the size and the depth of the lesion."
    if c == "osteophyte":
        return f"Grade the osteophyte at {region}."
    if c == "hoffa_synovitis":
        return f"Grade Hoffa-synovitis: signal change in {region}."
    if c == "effusion_synovitis":
        return "Grade the effusion-synovitis of the knee joint."
    if c == "meniscal_extrusion":
        direction = spec.finding_key.split()[2]
        return f"Grade the {direction} extrusion of the {spec.compartment} meniscus beyond the tibial margin."
    if c == "meniscal_morphology":
        return f"Classify the morphology of {region}."
    if c == "meniscal_cyst":
        return (f"Is there a {spec.compartment} parameniscal cyst, and where is the meniscal tear "
                f"associated with it?")
    if c == "meniscal_hypertrophy":
        return f"Is the {spec.compartment} meniscus hypertrophic?"
    if c == "meniscal_root_tear":
        return f"Is there a tear of {region}?"
    if c == "ligament_tendon":
        return f"Assess {region}."
    if c == "periarticular":
        return f"Is there evidence of {_finding_name(spec)}?"
    raise KeyError(f"question {spec.question_id}: unknown category {c!r}")


def answer_shape(spec: QuestionSpec) -> str:
    """JSON shape of the severity answer with grade ranges, e.g. ``{"ACL": {"Complete Tear": <0-1>}}``."""
    fields = ", ".join(f'"{f.key}": <{f.grades[0]}-{f.max_grade}>' for f in spec.fields)
    return f'{{"{spec.finding_key}": {{{fields}}}}}'


def question_prompt(spec: QuestionSpec, style: str = "plain") -> str:
    """Prompt text of a question in one of ``PROMPT_STYLES``."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {list(PROMPT_STYLES)}")
    question = f"This is a sagittal 3D knee MRI volume. {question_text(spec)}"
    if style == "plain":
        return f"{question}\nAnswer with JSON: {answer_shape(spec)}"
    grades = []
    for f in spec.fields:
        defs = "; ".join(f"{g} = {grade_description(spec, f.key, g)}" for g in f.grades)
        grades.append(f"- {f.key}: {defs}")
    return "\n".join([
        "You are a musculoskeletal radiologist grading knee MRI with the MOAKS system.",
        question,
        "Grades:",
        *grades,
        *answer_instructions(spec),
    ])


def answer_instructions(spec: QuestionSpec) -> list[str]:
    """The guided prompt's last lines: the answer format (``answer.py``) in words, the box before the grading."""
    return [
        f"Name the region first, then give the location of {region_phrase(spec)} as",
        f"{LOCATION_PREFIX} {BOX_START}[start_slice, end_slice, x_min, x_max, y_min, y_max]{BOX_END}",
        "with inclusive voxel indices: slices along array axis 0, rows (x) along axis 1, columns (y) along "
        "axis 2. Then reason step by step about what you see there, one short step per line. End with",
        f"{DIAGNOSIS_PREFIX} {answer_shape(spec)}",
    ]


def reasoning_template(spec: QuestionSpec) -> dict[str, dict[int, list[str]]]:
    """Reasoning steps per field and grade (``cot_question_mapping.json`` of one question).

    The first field's steps start with the region and what to look for, so concatenating the steps of
    every field (``reasoning_steps``) reads as one chain.
    """
    intro = [f"Region: {region_phrase(spec)}.", _LOOK_FOR[spec.category]]
    out: dict[str, dict[int, list[str]]] = {}
    for i, f in enumerate(spec.fields):
        out[f.key] = {g: (intro if i == 0 else []) + [f"{f.key}: {grade_description(spec, f.key, g)}, "
                                                      f"grade {g}."]
                      for g in f.grades}
    return out


def reasoning_steps(spec: QuestionSpec, severity: Mapping[str, int]) -> list[str]:
    """The reasoning chain of an answer: the template steps of each field's grade, in schema order."""
    template = reasoning_template(spec)
    return [step for f in spec.fields for step in template[f.key][severity[f.key]]]


RELEASE_QUESTION_FILES = {"plain": "questions_nobbox_zeroshot.json", "guided": "questions_nobbox_guided.json"}
"""Prompt style -> name of the release's question file of that style (``data/question_files``)."""


def release_answer_shape(spec: QuestionSpec) -> str:
    """JSON shape of the answer in the release's own form: inside the question's wrapper (``MOAKS_scores`` /
    ``MOAKS_grade`` / none) and, for a question whose schema field key is null, the grade right under the
    finding key."""
    if spec.question_id in null_field_questions():
        inner = f'{{"{spec.finding_key}": <{spec.fields[0].grades[0]}-{spec.fields[0].max_grade}>}}'
    else:
        inner = answer_shape(spec)
    return f'{{"{spec.wrapper}": {inner}}}' if spec.wrapper else inner


def release_question_text(spec: QuestionSpec, style: str = "plain") -> str:
    """One entry of a release-format question file: the question, the MOAKS grade meanings (``moaks.py``)
    and the JSON answer shape; ``guided`` adds what the finding looks like on the image."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {list(PROMPT_STYLES)}")
    parts = [f"This is a sagittal 3D DESS knee MRI. {question_text(spec)}"]
    if style == "guided":
        parts.append(_LOOK_FOR[spec.category])
    grades = []
    for f in spec.fields:
        defs = ", ".join(f"{g} = {grade_description(spec, f.key, g)}" for g in f.grades)
        grades.append(f"{f.key}: {defs}" if spec.question_id not in null_field_questions() else defs)
    parts.append("MOAKS grades - " + "; ".join(grades) + ".")
    parts.append(f"Explain your reasoning, then give the grades as a JSON object: {release_answer_shape(spec)}")
    return " ".join(parts)
