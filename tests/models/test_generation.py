"""Constrained decoding: boxes are always well-formed, severity JSON always parses with valid grades."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoProcessor, LogitsProcessorList

from reasonknee3d.constants import BOX_END, BOX_START, DIAGNOSIS_PREFIX
from reasonknee3d.parsing import parse_output
from reasonknee3d.models.generation import (BoxLogitsProcessor, SeverityJSONLogitsProcessor,
                                            constrained_logits_processors)
from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration
from reasonknee3d.schema import get_question, load_schema

# Toy vocabulary: 1 = <|box_start|>, 2 = <|box_end|>, 10..25 = 16 coordinate bins, the rest is text.
BOX_S, BOX_E, COORDS = 1, 2, list(range(10, 26))


def _sample(processors: LogitsProcessorList, prompt: torch.Tensor, steps: int, vocab: int, seed: int,
            boost: dict[int, float] | None = None) -> torch.Tensor:
    """Decode from random logits (a stand-in for a random model) through the processors."""
    g = torch.Generator().manual_seed(seed)
    ids = prompt
    for _ in range(steps):
        scores = torch.randn(ids.shape[0], vocab, generator=g) * 3
        for tok, b in (boost or {}).items():
            scores[:, tok] += b
        scores = processors(ids, scores)
        nxt = torch.multinomial(scores.softmax(-1), 1, generator=g)
        ids = torch.cat([ids, nxt], 1)
    return ids


def _boxes_well_formed(gen: list[int]) -> int:
    """Checks the box grammar on generated ids; returns the number of complete boxes."""
    n, i = 0, 0
    while i < len(gen):
        t = gen[i]
        assert t != BOX_E and t not in COORDS, f"{t} outside a box at {i}: {gen}"
        if t == BOX_S:
            body = gen[i + 1:i + 8]
            if len(body) < 7:  # the sequence ended inside a box: what is there must be coordinates
                assert all(c in COORDS for c in body)
                return n
            bins = [COORDS.index(c) for c in body[:6]]
            assert body[6] == BOX_E and all(lo <= hi for lo, hi in zip(bins[::2], bins[1::2])), gen
            n, i = n + 1, i + 8
            continue
        i += 1
    return n


def test_box_processor_only_produces_well_formed_boxes():
    proc = LogitsProcessorList([BoxLogitsProcessor(BOX_S, BOX_E, COORDS)])
    prompt = torch.full((8, 3), 30)
    total = 0
    for seed in range(4):  # 32 sequences; <|box_start|> boosted so boxes are frequent
        out = _sample(proc, prompt, 40, 64, seed, boost={BOX_S: 4.0, BOX_E: 8.0, **{c: 6.0 for c in COORDS}})
        total += sum(_boxes_well_formed(row[3:].tolist()) for row in out)
    assert total >= 20


def test_median_box_decoding_forces_the_median_allowed_bin():
    proc = BoxLogitsProcessor(BOX_S, BOX_E, COORDS, decoding="median")
    # A bimodal distribution over the 16 bins: bin 2 is the mode (0.4) but bins 9..12 together hold 0.6.
    probs = torch.full((16,), 1e-6)
    probs[2], probs[9:13] = 0.4, 0.15
    scores = torch.full((1, 64), -1e9)
    scores[0, COORDS] = probs.log()
    proc(torch.tensor([[30]]), scores.clone())  # the prompt; the box starts in the generated tokens
    out = proc(torch.tensor([[30, BOX_S]]), scores.clone())
    assert torch.isfinite(out[0]).sum() == 1 and out[0].argmax() == COORDS[9]  # cdf: 0.4, ... 0.55 at bin 9
    torch.testing.assert_close(out[0, COORDS[9]], scores[0, COORDS[9]])
    # A max coordinate: the median of the distribution left over bins >= the min just written (bin 10 here).
    out = proc(torch.tensor([[30, BOX_S, COORDS[10]]]), scores.clone())
    assert out[0].argmax() == COORDS[11]  # bins 10, 11, 12 hold a third each: the cdf passes 0.5 at bin 11
    # argmax decoding leaves the model's scores of every allowed bin as they were.
    plain_proc = BoxLogitsProcessor(BOX_S, BOX_E, COORDS, decoding="argmax")
    plain_proc(torch.tensor([[30]]), scores.clone())
    plain = plain_proc(torch.tensor([[30, BOX_S]]), scores.clone())
    assert torch.isfinite(plain[0]).sum() == 16 and plain[0].argmax() == COORDS[2]
    with pytest.raises(ValueError, match="box decoding must be one of"):
        BoxLogitsProcessor(BOX_S, BOX_E, COORDS, decoding="mean")


def test_box_processor_ignores_prompt_boxes_and_restarts_per_call():
    proc = BoxLogitsProcessor(BOX_S, BOX_E, COORDS)
    prompt = torch.tensor([[30, BOX_S, 12, 13]])  # an unfinished box in the prompt is not ours to finish
    scores = proc(prompt, torch.zeros(1, 64))
    assert torch.isinf(scores[0, COORDS]).all() and torch.isinf(scores[0, BOX_E])
    scores = proc(torch.tensor([[30, 31, BOX_S]]), torch.zeros(1, 64))  # a new, shorter call
    assert torch.isinf(scores[0, COORDS]).all()  # <|box_start|> was the prompt's last token


@pytest.fixture(scope="module")
def tokenizer(rk3d_dir):
    return AutoProcessor.from_pretrained(rk3d_dir).tokenizer


def _coord_ids(tokenizer, k: int = 16) -> list[int]:
    return tokenizer.convert_tokens_to_ids([f"<|coord_{i}|>" for i in range(k)])


def _check_parses(texts: list[str], qids: list[int], need_box: list[bool]) -> None:
    for text, qid, box in zip(texts, qids, need_box):
        parsed = parse_output(text, get_question(qid))
        assert parsed.severity_found and all(v is not None for v in parsed.severity.values()), text
        assert parsed.invalid_grades == 0
        if box:
            assert parsed.box is not None and not parsed.box_repaired, text


def test_severity_tail_is_forced_when_the_budget_runs_out(tokenizer):
    qids = sorted(load_schema())[::3][:8] + [44, 45, 60, 69]  # incl. null field keys and 0-8 grades
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    rng_prompt = torch.full((len(qids), 4), tokenizer.convert_tokens_to_ids("a"))
    coords = _coord_ids(tokenizer)
    need_box = [i % 2 == 0 for i in range(len(qids))]
    for seed in range(2):  # 24 sequences
        procs = constrained_logits_processors(tokenizer, qids, max_new_tokens=90, num_bins=16, require_box=need_box)
        out = _sample(procs, rng_prompt, 90, len(tokenizer), seed, boost={coords[0]: 2.0})
        texts = []
        for row in out[:, 4:].tolist():
            assert im_end in row, "the forced tail ends with <|im_end|>"
            _box_grammar_real(tokenizer, row[:row.index(im_end)])
            texts.append(tokenizer.decode(row[:row.index(im_end)], skip_special_tokens=False))
        _check_parses([_voxelize(t) for t in texts], qids, need_box)


def _box_grammar_real(tokenizer, ids: list[int]) -> None:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    spans = re.findall(re.escape(BOX_START) + r"(.*?)" + re.escape(BOX_END), text)
    for span in spans:
        bins = [int(b) for b in re.findall(r"<\|coord_(\d+)\|>", span)]
        assert len(bins) == 6 and re.fullmatch(r"(<\|coord_\d+\|>){6}", span), span
        assert all(lo <= hi for lo, hi in zip(bins[::2], bins[1::2])), span
    assert text.count(BOX_START) == len(spans)


def _voxelize(text: str) -> str:
    from reasonknee3d.boxes import coord_tokens_to_text
    return coord_tokens_to_text(text, (16, 16, 16), 16)


def test_model_written_prefix_switches_to_the_schema_template(tokenizer):
    qid = 1  # three 0-3 fields
    proc = SeverityJSONLogitsProcessor(tokenizer, [qid], max_new_tokens=200)
    prompt = torch.tensor([tokenizer("Reasoning.\n", add_special_tokens=False).input_ids])
    prefix = tokenizer(DIAGNOSIS_PREFIX, add_special_tokens=False).input_ids
    ids = prompt
    for t in prefix:  # the model writes the prefix itself: nothing is forced yet
        scores = proc(ids, torch.zeros(1, len(tokenizer)))
        assert torch.isfinite(scores).sum() > 100
        ids = torch.cat([ids, torch.tensor([[t]])], 1)
    g = torch.Generator().manual_seed(0)
    while ids[0, -1] != tokenizer.convert_tokens_to_ids("<|im_end|>"):
        scores = proc(ids, torch.randn(1, len(tokenizer), generator=g))
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], 1)
    text = tokenizer.decode(ids[0, prompt.shape[1]:-1], skip_special_tokens=False)
    assert re.fullmatch(r'Final diagnosis: \{"patella medial BML": \{"Size of BML \(including cyst\)": [0-3], '
                        r'"Number of BML within subregion": [0-3], "% of lesion that is BML \(excluding cyst\)": '
                        r'[0-3]\}\}', text), text


def test_too_small_budget_is_an_error_naming_both_numbers(tokenizer):
    proc = SeverityJSONLogitsProcessor(tokenizer, [1], max_new_tokens=5)
    with pytest.raises(ValueError, match=r"max_new_tokens 5 leaves 5 tokens.*needs \d+"):
        proc(torch.tensor([[5, 6]]), torch.zeros(1, len(tokenizer)))


def test_random_weight_model_generates_only_parseable_answers(rk3d_dir):
    processor = AutoProcessor.from_pretrained(rk3d_dir)
    model = ReasonKnee3DForConditionalGeneration.from_pretrained(rk3d_dir).eval()
    qids = [1, 16, 30, 43, 44, 48, 60, 62, 5, 20, 35, 50] * 2  # 24 sampled answers in one call
    need_box = [i % 3 != 0 for i in range(len(qids))]
    batch = processor(torch.randn(len(qids), 1, 8, 16, 16), [f"Question {q}?" for q in qids])
    torch.manual_seed(0)
    procs = constrained_logits_processors(processor.tokenizer, qids, 120, num_bins=16, require_box=need_box)
    out = model.generate(**batch, logits_processor=procs, max_new_tokens=120, do_sample=True, temperature=1.5,
                         top_k=0)
    texts = processor.batch_decode(out[:, batch["input_ids"].shape[1]:], orig_shapes=[(8, 16, 16)] * len(qids))
    _check_parses(texts, qids, need_box)
    assert all(text.count(DIAGNOSIS_PREFIX) >= 1 for text in texts)


def _byte_level_bpe(qwen_split: bool):
    """A small BPE on the package corpus: Qwen's pre-tokenizer, or plain byte-level (space glued to digits)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from reasonknee3d.models.tiny_qwen import QWEN2_SPLIT_PATTERN, default_corpus
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not qwen_split)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), "isolated"),
                                                  byte_level]) if qwen_split else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(default_corpus(), trainers.BpeTrainer(
        vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_tokens(["<|im_end|>", "<|endoftext|>", BOX_START, BOX_END], special_tokens=True)
    return fast


@pytest.mark.parametrize("qwen_split", [True, False])
def test_forced_diagnosis_tail_is_tokenized_like_the_training_answer(qwen_split):
    # Training tokenizes the whole answer; the forced tail must pick the same tokens, or the model chooses the
    # grade from a context it never saw (a byte-level BPE glues the space to the digit: ' 0').
    from reasonknee3d.answer import diagnosis_json
    tok = _byte_level_bpe(qwen_split)
    glued = len(tok(": 0", add_special_tokens=False).input_ids) == 2
    assert glued != qwen_split
    for qid in (1, 44, 62):
        spec = get_question(qid)
        proc = SeverityJSONLogitsProcessor(tok, [qid], 300)
        grades = {f.key: f.grades[-1] for f in spec.fields}
        expect = tok("\n" + DIAGNOSIS_PREFIX + " " + diagnosis_json(spec, grades) + "<|im_end|>",
                     add_special_tokens=False).input_ids
        slots = proc.template(qid, "full")
        assert len(slots) == len(expect)
        assert all(int(t) in slot.tolist() for t, slot in zip(expect, slots))
