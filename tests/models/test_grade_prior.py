"""The grade-prior correction: wordings read from training answers, a trie whose branch biases sum to the log
prior, and a processor that biases only the tokens that choose a grade's wording right after ``<field>:``."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoProcessor

from reasonknee3d.answer import format_answer
from reasonknee3d.models.generation import constrained_logits_processors
from reasonknee3d.models.grade_prior import GradePrior, GradePriorLogitsProcessor
from reasonknee3d.prompts import grade_description, reasoning_steps
from reasonknee3d.schema import get_question

QID = 1  # bone marrow lesion: three fields, grades 0..3
SIZE = "Size of BML (including cyst)"


@pytest.fixture(scope="module")
def tokenizer(rk3d_dir):
    return AutoProcessor.from_pretrained(rk3d_dir).tokenizer


def _sample(qid: int, severity: dict[str, int], answer: str | None = None) -> SimpleNamespace:
    spec = get_question(qid)
    sev = {f.key: severity.get(f.key, 0) for f in spec.fields}
    text = answer if answer is not None else format_answer(spec, reasoning_steps(spec, sev), [1, 2, 3, 4, 5, 6], sev)
    return SimpleNamespace(question_id=qid, answer=text, severity=sev)


def _train(counts: dict[int, int], qid: int = QID) -> list[SimpleNamespace]:
    return [_sample(qid, {SIZE: g}) for g, n in counts.items() for _ in range(n)]


def _path_bias(wording, path: tuple[int, ...]) -> float:
    return sum(wording.children[path[:k]][path[k]] for k in range(len(path)))


def test_branch_biases_along_each_wording_sum_to_the_log_prior(tokenizer) -> None:
    counts = {0: 6, 1: 3, 2: 1}  # grade 3 never seen: no wording, not in the trie
    prior = GradePrior.from_samples(_train(counts), tokenizer, tau=1.0)
    (size,) = [w for w in prior.fields[QID] if w.key == SIZE]
    assert sorted(size.grades.values()) == [0, 1, 2]
    total = sum(n + 1 for n in counts.values())  # add-one over the worded grades
    for path, g in size.grades.items():
        assert _path_bias(size, path) == pytest.approx(math.log((counts[g] + 1) / total))
        assert tokenizer.decode(list(path)) == f" {grade_description(get_question(QID), SIZE, g)}, grade {g}."
    # The other two fields are always grade 0 here: nothing to correct, and said why.
    assert set(prior.left_out) == {(QID, "Number of BML within subregion"), (QID, "% of lesion that is BML (excluding cyst)")}
    assert all(r.startswith("fewer than two grades") for r in prior.left_out.values())
    assert prior.counts["bone_marrow_lesion", SIZE] == counts
    assert "corrects 1 (question, field) pairs, leaves out 2 (fewer than two grades x2)" in prior.summary()


def _custom(grade: int, wording: str) -> SimpleNamespace:
    return _sample(QID, {SIZE: grade}, answer=f"Region: somewhere.\n{SIZE}: {wording}\nFinal diagnosis: {{}}")


def test_wordings_that_share_first_tokens_split_the_prior_where_they_part(tokenizer) -> None:
    words = {0: "none seen, grade 0.", 1: "small lesion, grade 1.", 2: "small cyst, grade 2."}
    counts = {0: 5, 1: 2, 2: 1}
    prior = GradePrior.from_samples([_custom(g, words[g]) for g, n in counts.items() for _ in range(n)],
                                    tokenizer, tau=1.0)
    (size,) = prior.fields[QID]
    paths = {g: p for p, g in size.grades.items()}
    assert paths[1][0] == paths[2][0] != paths[0][0]  # " small" starts both: one branch at the root
    w = {g: n + 1 for g, n in counts.items()} | {3: 1}  # grade 3 has no wording; the smoothing counts it anyway
    root = size.children[()]
    assert root[paths[1][0]] == pytest.approx(math.log((w[1] + w[2]) / (w[0] + w[1] + w[2])))
    assert root[paths[0][0]] == pytest.approx(math.log(w[0] / (w[0] + w[1] + w[2])))
    part = next(k for k in range(len(paths[1])) if paths[1][k] != paths[2][k])
    assert size.children[paths[1][:part]][paths[1][part]] == pytest.approx(math.log(w[1] / (w[1] + w[2])))
    for g, p in paths.items():
        assert _path_bias(size, p) == pytest.approx(math.log(w[g] / (w[0] + w[1] + w[2])))


def test_fields_without_one_wording_per_grade_are_left_out_with_the_reason(tokenizer) -> None:
    two_ways = [_custom(0, "none, grade 0."), _custom(0, "nothing, grade 0."), _custom(1, "small, grade 1.")]
    prior = GradePrior.from_samples(two_ways, tokenizer, tau=1.0)
    assert QID not in prior.fields
    assert prior.left_out[QID, SIZE] == ("more than one wording: grades [0] are written in several ways in the "
                                         "training answers")
    no_lines = [_sample(QID, {SIZE: g}, answer="Region: x.\nFinal diagnosis: {}") for g in (0, 1)]
    none = GradePrior.from_samples(no_lines, tokenizer, tau=1.0)
    assert none.fields == {} and len(none.left_out) == 3
    assert none.left_out[QID, SIZE] == f"no wording: no line of the training answers starts with '{SIZE}:'"
    assert none.summary().endswith("corrects 0 (question, field) pairs, leaves out 3 (no wording x3)")
    with pytest.raises(ValueError, match=r"grade prior tau must be a finite number >= 0, got -0.5"):
        GradePrior(tau=-0.5)


def _step(proc, ids: list[list[int]], vocab: int) -> torch.Tensor:
    return proc(torch.tensor(ids), torch.zeros(len(ids), vocab))


def test_the_processor_biases_only_the_grade_choice_after_the_field_colon(tokenizer) -> None:
    tau = 0.7
    prior = GradePrior.from_samples(_train({0: 6, 1: 3, 2: 1}), tokenizer, tau=tau)
    (size,) = [w for w in prior.fields[QID] if w.key == SIZE]
    other_qid = 30  # not in the prior: its row is never touched
    proc = GradePriorLogitsProcessor(prior, tokenizer, [QID, other_qid])
    vocab = len(tokenizer)
    encode = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    prompt = encode("question")
    grade1 = next(p for p, g in size.grades.items() if g == 1)
    text = encode(f"Region: somewhere.\nLocation: here.\n{SIZE}:") + list(grade1) + encode("\nmore text")
    trigger_end = len(encode(f"Region: somewhere.\nLocation: here.\n{SIZE}:"))
    rows = [prompt[:], prompt[:]]
    seen = []
    for k in range(len(text) + 1):
        scores = _step(proc, rows, vocab)
        assert not scores[1].any()  # the other question's row
        touched = {int(t): float(scores[0, t]) for t in scores[0].nonzero().flatten()}
        seen.append(touched)
        if k < len(text):
            rows[0].append(text[k])
            rows[1].append(text[k])
    # Nothing before the colon; at the colon the root branches; inside grade 1's wording only where it branches.
    assert all(not t for t in seen[:trigger_end])
    for j in range(len(grade1) + 1):
        node = grade1[:j]
        branches = size.children.get(node, {})
        expected = {t: -tau * v for t, v in branches.items()} if len(branches) > 1 else {}
        assert seen[trigger_end + j] == pytest.approx(expected), f"step {j} of the wording"
    assert seen[trigger_end]  # the root is a real choice
    assert all(not t for t in seen[trigger_end + len(grade1):])  # after the wording: untouched


def test_the_processor_leaves_the_trie_when_the_model_writes_something_else(tokenizer) -> None:
    prior = GradePrior.from_samples(_train({0: 4, 1: 1}), tokenizer, tau=1.0)
    proc = GradePriorLogitsProcessor(prior, tokenizer, [QID])
    encode = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
    ids = encode("q") + encode(f"Region: x.\n{SIZE}:")
    for k in range(len(encode("q")), len(ids) + 1):
        scores = _step(proc, [ids[:k]], len(tokenizer))
    assert scores.any()
    off = encode("zzz")[0]
    assert not _step(proc, [ids + [off]], len(tokenizer)).any()


def test_tau_zero_adds_no_processor_and_a_positive_tau_goes_first(tokenizer) -> None:
    prior = GradePrior.from_samples(_train({0: 2, 1: 1}), tokenizer, tau=0.0)
    procs = constrained_logits_processors(tokenizer, [QID], 64, num_bins=16, grade_prior=prior)
    assert not any(isinstance(p, GradePriorLogitsProcessor) for p in procs)
    prior.tau = 0.5
    procs = constrained_logits_processors(tokenizer, [QID], 64, num_bins=16, grade_prior=prior)
    assert isinstance(procs[0], GradePriorLogitsProcessor) and len(procs) == 3
