"""Grade-prior correction at generation: divide each grade's probability by its training frequency, tau-th power.

A model trained on answers where most regions are normal learns p(grade | volume) with the training prior
inside it; greedy decoding then writes the frequent grade whenever the image evidence is weak, which is what
balanced accuracy punishes. The correction scores grade g by ``log p(g | volume) - tau * log prior(g)``
(tau 0: plain decoding; tau 1: divide out the prior, the balanced-accuracy decision when the probabilities are
calibrated). It acts where the grade is decided: in the reasoning line ``<field>: <wording of the grade>...``
the answer writes before its ``Final diagnosis`` JSON (``answer.format_answer``), whose JSON then follows it.

The wordings are read from the training split's own answers (``GradePrior.from_samples``), not assumed: for
each (question, field), the line that starts with ``<field>:`` in answers of grade g is that grade's wording.
Their token sequences after the colon form a trie; at every branching of the trie the tokens that start each
branch get ``-tau * log P(branch | node)``, with ``P`` from the train counts of the question's (category, field)
(the scorer's balanced-accuracy group), add-one smoothed over the field's grades. Along the path of grade g the
terms sum to ``-tau * log prior(g)`` whatever the tokenizer does with shared first words. A field is left out
(and listed in ``GradePrior.left_out`` with the reason) when its grades do not each have one wording, when
fewer than two grades have one, when no answer line starts with ``<field>:``, or when the tokenizer does not
split the line after the colon.

``GradePriorLogitsProcessor`` applies it; it goes before the constraint processors
(``generation.constrained_logits_processors``), which then mask as usual.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from transformers import LogitsProcessor

from ..schema import get_question


@dataclass(frozen=True)
class FieldWordings:
    """The trie of one (question, field)'s grade wordings after ``<field>:``."""

    key: str
    """The field key, as the line starts: ``f"{key}:"``."""
    children: Mapping[tuple[int, ...], Mapping[int, float]]
    """Token path after the colon -> {next token: log P(its branch | this node)} for every inner node."""
    grades: Mapping[tuple[int, ...], int]
    """Complete token path -> the grade whose wording it is."""

    @property
    def trigger(self) -> str:
        return f"\n{self.key}:"


@dataclass
class GradePrior:
    """Per question id, the wording tries of its fields; ``tau`` scales the correction."""

    tau: float
    fields: dict[int, list[FieldWordings]] = field(default_factory=dict)
    counts: dict[tuple[str, str], dict[int, int]] = field(default_factory=dict)
    """(category, field key) -> grade -> train count (the prior before smoothing)."""
    left_out: dict[tuple[int, str], str] = field(default_factory=dict)
    """(question id, field key) -> why that field gets no correction."""

    def __post_init__(self) -> None:
        if not (isinstance(self.tau, (int, float)) and math.isfinite(self.tau) and self.tau >= 0):
            raise ValueError(f"grade prior tau must be a finite number >= 0, got {self.tau!r}")

    @classmethod
    def from_samples(cls, samples: Iterable[Any], tokenizer: Any, tau: float, smoothing: float = 1.0) -> "GradePrior":
        """Build from training samples (``data.release.Sample``: ``question_id``, ``answer``, ``severity``)."""
        counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
        wordings: dict[tuple[int, str], dict[int, set[str]]] = collections.defaultdict(
            lambda: collections.defaultdict(set))
        seen: set[tuple[int, str]] = set()
        for s in samples:
            spec = get_question(s.question_id)
            lines = s.answer.splitlines()
            for f in spec.fields:
                g = int(s.severity[f.key])
                counts[spec.category, f.key][g] += 1
                seen.add((s.question_id, f.key))
                head = f"{f.key}:"
                for line in lines:
                    if line.startswith(head):
                        wordings[s.question_id, f.key][g].add(line[len(head):])
                        break
        prior = cls(tau=float(tau), counts={k: dict(v) for k, v in counts.items()})
        for (qid, key), by_grade in sorted(wordings.items()):
            spec = get_question(qid)
            made = _field_trie(tokenizer, key, by_grade, counts[spec.category, key], spec.field(key).grades, smoothing)
            if isinstance(made, str):
                prior.left_out[qid, key] = made
            else:
                prior.fields.setdefault(qid, []).append(made)
        for qid, key in sorted(seen - set(wordings)):
            prior.left_out[qid, key] = f"no wording: no line of the training answers starts with '{key}:'"
        return prior

    @classmethod
    def from_release(cls, data_dir: Any, tokenizer: Any, tau: float, split: str = "train",
                     images: Any = None) -> "GradePrior":
        """Build from ``split`` (default ``train``) of the release at ``data_dir``."""
        from ..data.release import iter_samples
        prior = cls.from_samples(iter_samples(data_dir, split, images=images), tokenizer, tau)
        if not prior.counts:
            raise ValueError(f"{data_dir}: split {split!r} has no usable samples to estimate the grade prior from")
        return prior

    def summary(self) -> str:
        """One line: how many (question, field) pairs the correction covers and why others are left out."""
        n = sum(len(v) for v in self.fields.values())
        reasons = collections.Counter(r.split(":", 1)[0] for r in self.left_out.values())
        why = "; ".join(f"{k} x{c}" for k, c in reasons.most_common())
        return (f"grade prior (tau {self.tau:g}): corrects {n} (question, field) pairs"
                + (f", leaves out {len(self.left_out)} ({why})" if self.left_out else ""))


def _field_trie(tokenizer: Any, key: str, by_grade: Mapping[int, set[str]], counts: Mapping[int, int],
                grades: Sequence[int], smoothing: float) -> FieldWordings | str:
    """The trie of one field, or the reason it gets none."""
    several = sorted(g for g, w in by_grade.items() if len(w) > 1)
    if several:
        return f"more than one wording: grades {several} are written in several ways in the training answers"
    if len(by_grade) < 2:
        return "fewer than two grades: the training answers word only one grade of this field"
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    head = encode(f"{key}:")
    paths: dict[int, tuple[int, ...]] = {}
    for g, (wording,) in sorted(by_grade.items()):
        ids = encode(f"{key}:{wording}")
        if ids[: len(head)] != head or len(ids) == len(head):
            return f"tokenizer merges across the colon: '{key}:' is not a token prefix of its lines"
        paths[g] = tuple(ids[len(head):])
    for g, p in paths.items():
        if any(h != g and q[: len(p)] == p for h, q in paths.items()):
            return f"one wording is a prefix of another: grade {g}'s line starts another grade's line"
    weight = {g: counts.get(g, 0) + smoothing for g in grades}
    below: dict[tuple[int, ...], float] = collections.defaultdict(float)  # node -> weight of the grades under it
    for g, p in paths.items():
        for k in range(len(p) + 1):
            below[p[:k]] += weight[g]
    children: dict[tuple[int, ...], dict[int, float]] = collections.defaultdict(dict)
    for p in paths.values():
        for k in range(len(p)):
            node = p[:k]
            children[node][p[k]] = math.log(below[p[: k + 1]] / below[node])
    return FieldWordings(key=key, children=dict(children), grades={p: g for g, p in paths.items()})


class GradePriorLogitsProcessor(LogitsProcessor):
    """Adds ``-tau * log P(branch | node)`` to the tokens that start each grade wording's branch, in the rows
    whose generated text has just written ``\\n<field>:`` of one of their question's corrected fields.

    Each row follows the trie while the model writes a wording's tokens and leaves it at the wording's end or
    at the first token off every wording. Rows are matched to ``question_ids`` like the severity processor's
    (one per row; beam search is not supported). Only generated tokens are looked at.
    """

    def __init__(self, prior: GradePrior, tokenizer: Any, question_ids: Sequence[int]) -> None:
        self.prior, self.tokenizer = prior, tokenizer
        self.question_ids = [int(q) for q in question_ids]
        self._window = 2 + max((len(w.key) for ws in prior.fields.values() for w in ws), default=0)
        self._prompt_len: Optional[int] = None
        self._last_len = -1
        self._state: list[Optional[tuple[FieldWordings, tuple[int, ...]]]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cur = input_ids.shape[1]
        if self._prompt_len is None or cur != self._last_len + 1:  # a new generate call
            self._prompt_len = cur
            self._state = [None] * input_ids.shape[0]
        self._last_len = cur
        if input_ids.shape[0] != len(self.question_ids):
            raise ValueError(f"batch has {input_ids.shape[0]} rows but {len(self.question_ids)} question ids were "
                             "given (one per row; beam search is not supported)")
        if self.prior.tau == 0:
            return scores
        for row, qid in enumerate(self.question_ids):
            wordings = self.prior.fields.get(qid)
            if not wordings:
                continue
            state = self._state[row]
            if state is not None:  # follow the token the model just wrote
                wording, path = state
                token = int(input_ids[row, -1])
                path = path + (token,)
                # Still inside a wording with a choice ahead: keep following; off the wordings or at the end: leave.
                state = (wording, path) if token in wording.children[state[1]] and path in wording.children else None
            if state is None and cur > self._prompt_len:
                tail = self.tokenizer.decode(input_ids[row, max(self._prompt_len, cur - self._window):].tolist(),
                                             skip_special_tokens=False)
                state = next(((w, ()) for w in wordings if tail.endswith(w.trigger)), None)
            self._state[row] = state
            if state is not None:
                branches = state[0].children[state[1]]
                if len(branches) > 1:
                    ids = torch.tensor(list(branches), device=scores.device)
                    bias = torch.tensor(list(branches.values()), device=scores.device, dtype=scores.dtype)
                    scores[row, ids] -= self.prior.tau * bias
        return scores
