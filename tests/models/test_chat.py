"""Qwen chat encoding: prompt from the tokenizer's own template, labels only on the answer."""
from __future__ import annotations

import pytest

from reasonknee3d.constants import IGNORE_INDEX, VIDEO_PAD, VISION_END, VISION_START
from reasonknee3d.models.chat import decode_answer, encode_example
from reasonknee3d.models.tiny_qwen import default_tiny_qwen_dir


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(default_tiny_qwen_dir(tmp_path_factory.getbasetemp()))


MEDIA = VISION_START + VIDEO_PAD * 5 + VISION_END
ANSWER = 'Bone looks normal.\nFinal diagnosis: {"patella medial BML": {"grade": 0}}'


def test_labels_cover_only_answer_and_im_end(tokenizer):
    ex = encode_example(tokenizer, "Grade the BML.", ANSWER, media=MEDIA)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    supervised = [t for t, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tokenizer.decode(supervised, skip_special_tokens=False) == ANSWER + "<|im_end|>"
    assert all(l == t for t, l in zip(ids, labels) if l != IGNORE_INDEX)
    # Labels form one contiguous span right after the generation prompt.
    first = labels.index(next(l for l in labels if l != IGNORE_INDEX))
    gen = encode_example(tokenizer, "Grade the BML.", None, media=MEDIA)
    assert ids[:first] == gen["input_ids"]
    assert set(gen["labels"]) == {IGNORE_INDEX}
    assert decode_answer(tokenizer, ids[first:]) == ANSWER


def test_prefix_is_the_tokenizers_chat_template(tokenizer):
    gen = encode_example(tokenizer, "Where is it?", None, media=MEDIA, system="Be brief.")
    text = tokenizer.decode(gen["input_ids"], skip_special_tokens=False)
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": MEDIA + "Where is it?"}],
        tokenize=False, add_generation_prompt=True)
    assert text == expected
    assert text.index(MEDIA) < text.index("Where is it?")
    assert gen["input_ids"].count(tokenizer.convert_tokens_to_ids(VIDEO_PAD)) == 5


def test_tokenizer_without_template_is_rejected(tokenizer):
    import copy
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        encode_example(bare, "p", "a")
