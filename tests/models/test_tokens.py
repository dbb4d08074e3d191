"""Coordinate tokens: added once, never split, rows initialised so neighbouring bins start similar."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from reasonknee3d.boxes import box_to_coord_tokens, coord_tokens_to_text
from reasonknee3d.models.chat import decode_answer
from reasonknee3d.models.tiny_qwen import default_tiny_qwen_dir
from reasonknee3d.models.tokens import (add_box_tokens, add_box_tokens_to_model, coord_token_bins,
                                        init_new_embeddings)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return default_tiny_qwen_dir(tmp_path_factory.getbasetemp())


@pytest.fixture
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_add_box_tokens_is_idempotent_and_atomic(tokenizer):
    n = len(tokenizer)
    ids = add_box_tokens(tokenizer, 16, extra=["<|volume_pad|>"])
    assert ids == list(range(n, n + 17))
    assert add_box_tokens(tokenizer, 16, extra=["<|volume_pad|>"]) == ids
    assert len(tokenizer) == n + 17
    text = box_to_coord_tokens([0, 3, 4, 9, 10, 15], (16, 16, 16), 16)
    enc = tokenizer(text, add_special_tokens=False).input_ids
    assert len(enc) == 8  # box_start + 6 coordinates + box_end
    assert coord_token_bins(tokenizer, enc) == {i: b for i, b in zip(enc[1:7], [0, 3, 4, 9, 10, 15])}
    # The box survives generation-style decoding (special tokens kept, stop at <|im_end|>).
    decoded = decode_answer(tokenizer, enc + tokenizer("<|im_end|>junk", add_special_tokens=False).input_ids)
    assert coord_tokens_to_text(decoded, (16, 16, 16), 16) == "<|box_start|>[0, 3, 4, 9, 10, 15]<|box_end|>"


def test_model_rows_ordered_and_old_rows_untouched(tiny_dir, tokenizer):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_dir)
    before = model.get_input_embeddings().weight.detach().clone()
    n_old = len(tokenizer)
    k = 64  # more than the spare rows: forces a resize
    ids = add_box_tokens_to_model(model, tokenizer, k)
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape[0] >= len(tokenizer) > before.shape[0]
    assert model.config.text_config.vocab_size == emb.shape[0]
    assert torch.equal(emb[:n_old], before[:n_old])
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # still tied
    rows = emb[ids] - emb[:n_old].mean(0)
    cos = nn.functional.cosine_similarity
    near = cos(rows[10], rows[11], dim=0)
    far = cos(rows[0], rows[k - 1], dim=0)
    assert near > 0.95 and far < 0.3
    # A second call adds nothing and re-initialises nothing.
    again = add_box_tokens_to_model(model, tokenizer, k)
    assert again == ids and torch.equal(model.get_input_embeddings().weight.detach(), emb)


def test_untied_head_and_too_small_embedding(tokenizer):
    ids = add_box_tokens(tokenizer, 8)
    emb, head = nn.Embedding(len(tokenizer), 12), nn.Linear(12, len(tokenizer), bias=False)
    old_head = head.weight.detach().clone()
    init_new_embeddings(emb, head, ids, tokenizer)
    assert not torch.equal(head.weight[ids], old_head[ids])
    assert torch.equal(head.weight[: ids[0]], old_head[: ids[0]])
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        init_new_embeddings(nn.Embedding(ids[0], 12), None, ids, tokenizer)
