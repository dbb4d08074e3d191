"""Constrained decoding: well-formed boxes and schema-valid severity JSON, for either model family.

Both processors are ``transformers.LogitsProcessor`` s that only take token ids (and, for severity, a
tokenizer and one question id per batch row), so the slice baseline and the 3D model share them:

- ``BoxLogitsProcessor``: outside a box, coordinate tokens and ``<|box_end|>`` are banned; after
  ``<|box_start|>`` only coordinate tokens for six steps, each max bin >= its min bin (steps 2, 4, 6),
  then ``<|box_end|>`` is forced. Each coordinate is the median bin of the model's distribution over the
  allowed bins (``decoding="median"``, the default) or left to the decoding strategy (``"argmax"``:
  greedy takes the most probable bin); ``constants.BOX_DECODINGS``.
- ``SeverityJSONLogitsProcessor``: the end-of-answer tokens are banned until the answer's tail is forced
  from a template ``Final diagnosis: {"<finding>": {"<field>": G, ...}}`` + ``<|im_end|>``, where each G
  is one token among the field's allowed grades. The tail starts when the model has written
  ``Final diagnosis:`` itself, or when the remaining budget only just fits the whole tail (optionally
  preceded by a ``Location:`` box when the row has none yet). Every output then parses by construction.

Both look only at generated tokens; they remember the prompt length of the current ``generate`` call
(a call whose sequence did not grow by exactly one token starts a new one). Beam search reorders rows,
so the severity processor expects exactly one row per question id (repeat ids for ``num_return_sequences``).
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..constants import (BOX_DECODINGS, BOX_END, BOX_START, COORD_TOKEN_FORMAT, DEFAULT_BOX_DECODING, DIAGNOSIS_PREFIX,
                         ENDOFTEXT, IM_END, LOCATION_PREFIX)
from ..schema import QuestionSpec, get_question

if TYPE_CHECKING:
    from .grade_prior import GradePrior

# Tokens a box needs after <|box_start|>: six coordinates and <|box_end|>.
_BOX_TAIL = 7


class _PromptTracker:
    """Remembers where generation started within one ``generate`` call."""

    def __init__(self) -> None:
        self._prompt_len: Optional[int] = None
        self._last_len = -1

    def _generated_start(self, input_ids: torch.LongTensor) -> tuple[int, bool]:
        """Index of the first generated token, and whether this call started a new generation."""
        cur = input_ids.shape[1]
        # Greedy/sampled decoding grows the sequence by one token per call; anything else is a new call.
        new = self._prompt_len is None or cur != self._last_len + 1
        if new:
            self._prompt_len = cur
        self._last_len = cur
        return self._prompt_len, new


def _open_box_length(generated: list[int], box_start_id: int, box_end_id: int) -> Optional[int]:
    """Coordinates emitted in the box still open at the end of ``generated`` (None if no box is open)."""
    tail = generated[-_BOX_TAIL:]
    for k in range(len(tail) - 1, -1, -1):
        if tail[k] == box_end_id:
            return None
        if tail[k] == box_start_id:
            return len(tail) - 1 - k
    return None


class BoxLogitsProcessor(LogitsProcessor, _PromptTracker):
    """Every generated box is ``<|box_start|>`` + six ordered coordinate tokens + ``<|box_end|>``."""

    def __init__(self, box_start_id: int, box_end_id: int, coord_token_ids: Sequence[int],
                 decoding: str = DEFAULT_BOX_DECODING) -> None:
        _PromptTracker.__init__(self)
        if len(coord_token_ids) < 2:
            raise ValueError(f"need at least 2 coordinate token ids (one per bin), got {len(coord_token_ids)}")
        if decoding not in BOX_DECODINGS:
            raise ValueError(f"box decoding must be one of {BOX_DECODINGS}, got {decoding!r}")
        self.decoding = decoding
        self.box_start_id, self.box_end_id = int(box_start_id), int(box_end_id)
        self.coord_ids = torch.as_tensor(list(coord_token_ids), dtype=torch.long)
        self.bin_of = {int(t): k for k, t in enumerate(coord_token_ids)}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        start, _ = self._generated_start(input_ids)
        coords = self.coord_ids.to(scores.device)
        for row in range(input_ids.shape[0]):
            k = _open_box_length(input_ids[row, start:].tolist(), self.box_start_id, self.box_end_id)
            if k is None:
                scores[row, coords] = -float("inf")
                scores[row, self.box_end_id] = -float("inf")
                continue
            if k < 6:
                # Odd steps choose an axis max: it may not fall below the min bin just emitted.
                low = self.bin_of[int(input_ids[row, -1])] if k % 2 else 0
                allowed = coords[low:]
                if self.decoding == "median":
                    cdf = torch.softmax(scores[row, allowed].float(), dim=-1).cumsum(0)
                    allowed = allowed[int(torch.searchsorted(cdf, cdf.new_tensor(0.5)).clamp(max=len(allowed) - 1))
                                      ].reshape(1)
            else:
                allowed = torch.tensor([self.box_end_id], device=scores.device)
            _keep_only(scores, row, allowed)
        return scores


def _keep_only(scores: torch.FloatTensor, row: int, allowed: torch.Tensor) -> None:
    kept = scores[row, allowed].clone()
    scores[row] = -float("inf")
    scores[row, allowed] = kept


class SeverityJSONLogitsProcessor(LogitsProcessor, _PromptTracker):
    """Forces each row's answer to end in the schema-valid diagnosis of its question, then ``<|im_end|>``.

    ``require_box`` (one bool or one per row): a row with no complete ``<|box_start|>..<|box_end|>`` yet
    gets ``Location: <box>`` forced before the diagnosis (its coordinates chosen by the model; combine
    with ``BoxLogitsProcessor`` for their order). ``max_new_tokens`` must be the ``generate`` budget.
    """

    def __init__(self, tokenizer: Any, question_ids: Sequence[int], max_new_tokens: int,
                 require_box: bool | Sequence[bool] = False, coord_token_ids: Optional[Sequence[int]] = None) -> None:
        _PromptTracker.__init__(self)
        self.tokenizer = tokenizer
        self.question_ids = [int(q) for q in question_ids]
        self.max_new_tokens = int(max_new_tokens)
        self.require_box = ([bool(require_box)] * len(self.question_ids) if isinstance(require_box, bool)
                            else [bool(r) for r in require_box])
        if len(self.require_box) != len(self.question_ids):
            raise ValueError(f"require_box has {len(self.require_box)} values for {len(self.question_ids)} rows")
        tid = tokenizer.convert_tokens_to_ids
        self.end_ids = torch.tensor([tid(IM_END), tid(ENDOFTEXT)], dtype=torch.long)
        self.box_start_id, self.box_end_id = tid(BOX_START), tid(BOX_END)
        if any(self.require_box) and not coord_token_ids:
            raise ValueError("require_box needs coord_token_ids (the <|coord_k|> ids) to form the forced box")
        self.coord_ids = None if coord_token_ids is None else torch.as_tensor(list(coord_token_ids))
        # Tokens to decode when looking for the prefix: every token spells at least one character.
        self._prefix_window = len(DIAGNOSIS_PREFIX)
        # Templates per question: slots are token-id tensors (one id = forced, several = model picks).
        self._templates: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._state: list[Optional[tuple[int, list[torch.Tensor]]]] = []

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _fixed(self, text: str) -> list[torch.Tensor]:
        return [torch.tensor([t]) for t in self._encode(text)]

    def _grade_slot(self, text: str, grades: Sequence[int]) -> tuple[list[int], list[int]]:
        """Tokens of ``text`` and the one token per grade after them, split as the tokenizer splits
        ``text + grade`` inside a training answer: Qwen's BPE gives ``' '``, ``'0'`` but a byte-level BPE may
        glue the space to the digit (``' 0'``); forcing the wrong split puts the model off its training
        distribution exactly where it chooses the grade."""
        seqs = [self._encode(text + str(g)) for g in grades]
        n = min(len(os.path.commonprefix(seqs)), min(len(s) for s in seqs) - 1)
        bad = [g for g, s in zip(grades, seqs) if len(s) != n + 1]
        if bad:
            raise ValueError(f"grades {bad} after {text!r} are more than one token for this tokenizer; constrained "
                             "severity decoding needs every grade to be a single token")
        return seqs[0][:n], [s[n] for s in seqs]

    def template(self, question_id: int, kind: str) -> list[torch.Tensor]:
        """Slots of the forced tail: ``body`` (after the model's own prefix), ``full`` or ``full_box``."""
        key = (question_id, kind)
        if key not in self._templates:
            spec: QuestionSpec = get_question(question_id)
            slots: list[torch.Tensor] = []
            if kind == "full_box":
                slots += self._fixed(f"\n{LOCATION_PREFIX} ") + [torch.tensor([self.box_start_id])]
                slots += [self.coord_ids] * 6 + [torch.tensor([self.box_end_id])]
            # Same JSON spelling as answer.diagnosis_json (json.dumps separators), so training targets match.
            text = ("" if kind == "body" else f"\n{DIAGNOSIS_PREFIX}") + " {" + \
                json.dumps(spec.finding_key, ensure_ascii=False) + ": {"
            for i, f in enumerate(spec.fields):
                text += (", " if i else "") + json.dumps(f.key, ensure_ascii=False) + ": "
                fixed, choices = self._grade_slot(text, f.grades)
                slots += [torch.tensor([t]) for t in fixed] + [torch.tensor(choices)]
                text = ""
            slots += self._fixed("}}") + [self.end_ids[:1]]
            self._templates[key] = slots
        return self._templates[key]

    def _start(self, row: int, generated: list[int]) -> Optional[list[torch.Tensor]]:
        """The template to force from this step on, or None to let the model continue freely."""
        if _open_box_length(generated, self.box_start_id, self.box_end_id) is not None:
            return None  # never cut a box short; the budget below keeps room for it to close
        qid = self.question_ids[row]
        need_box = self.require_box[row] and self.box_end_id not in generated
        full = self.template(qid, "full_box" if need_box else "full")
        remaining = self.max_new_tokens - len(generated)
        if remaining <= len(full) + _BOX_TAIL:
            if remaining < len(full):
                raise ValueError(f"max_new_tokens {self.max_new_tokens} leaves {remaining} tokens but question "
                                 f"{qid}'s forced answer tail needs {len(full)}")
            return full
        if not need_box:
            recent = self.tokenizer.decode(generated[-self._prefix_window:], skip_special_tokens=False)
            if recent.endswith(DIAGNOSIS_PREFIX):
                return self.template(qid, "body")
        return None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        start, new = self._generated_start(input_ids)
        if input_ids.shape[0] != len(self.question_ids):
            raise ValueError(f"batch has {input_ids.shape[0]} rows but {len(self.question_ids)} question ids were "
                             "given (repeat each id for num_return_sequences; beam search is not supported)")
        if new:
            self._state = [None] * input_ids.shape[0]
        cur = input_ids.shape[1]
        for row in range(input_ids.shape[0]):
            if self._state[row] is None:
                tpl = self._start(row, input_ids[row, start:].tolist())
                if tpl is None:
                    scores[row, self.end_ids.to(scores.device)] = -float("inf")
                    continue
                self._state[row] = (cur, tpl)
            began, tpl = self._state[row]
            if cur - began < len(tpl):
                _keep_only(scores, row, tpl[cur - began].to(scores.device))
        return scores


def constrained_logits_processors(tokenizer: Any, question_ids: Sequence[int], max_new_tokens: int,
                                  num_bins: Optional[int] = None, severity: bool = True,
                                  require_box: bool | Sequence[bool] = False,
                                  box_decoding: str = DEFAULT_BOX_DECODING,
                                  grade_prior: Optional["GradePrior"] = None) -> LogitsProcessorList:
    """The processors for one ``generate`` call: boxes (when the tokenizer has ``num_bins`` coordinate
    tokens; coordinates chosen as ``box_decoding`` says) and, if ``severity``, the schema-constrained diagnosis
    tail. A ``grade_prior`` with tau > 0 (``models.grade_prior``) goes first, so the constraints mask after it."""
    out = LogitsProcessorList()
    if grade_prior is not None and grade_prior.tau > 0:
        from .grade_prior import GradePriorLogitsProcessor
        out.append(GradePriorLogitsProcessor(grade_prior, tokenizer, question_ids))
    coord_ids = None
    if num_bins is not None:
        tid = tokenizer.convert_tokens_to_ids
        coord_ids = [tid(COORD_TOKEN_FORMAT.format(k)) for k in range(num_bins)]
        if any(i is None or i == tokenizer.unk_token_id for i in coord_ids):
            raise ValueError(f"tokenizer lacks coordinate tokens for num_bins={num_bins} (tokens.add_box_tokens)")
        out.append(BoxLogitsProcessor(tid(BOX_START), tid(BOX_END), coord_ids, box_decoding))
    if severity:
        out.append(SeverityJSONLogitsProcessor(tokenizer, question_ids, max_new_tokens, require_box, coord_ids))
    return out
