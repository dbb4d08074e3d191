"""Trainable rows of added tokens without copying the embedding (models/token_rows.py) against peft's own layer."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration
from reasonknee3d.models.token_rows import GatheredTrainableTokensLayer, gather_token_rows

NEW = [117, 103, 110, 125]  # unsorted on purpose: peft keeps the given order in its delta


def _peft(toy, tied: bool):
    torch.manual_seed(0)
    model = ReasonKnee3DForConditionalGeneration(toy.config(tie_word_embeddings=tied))
    rows = {"model.language_model.embed_tokens": NEW} if tied else {
        "model.language_model.embed_tokens": NEW, "lm_head": NEW}
    config = LoraConfig(r=2, target_modules=r"model\.language_model\..*\.q_proj", trainable_token_indices=rows)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # trained-looking rows, different from the frozen matrix
        for layer in peft_model.modules():
            if isinstance(layer, TrainableTokensLayer) and layer.tied_adapter is None:
                layer.trainable_tokens_delta["default"].add_(torch.randn_like(layer.trainable_tokens_delta["default"]))
    return peft_model


@pytest.mark.parametrize("tied", [True, False])
def test_same_outputs_and_gradients_as_peft_and_only_new_rows_train(toy, tied):
    ref = _peft(toy, tied)
    ours = copy.deepcopy(ref)
    assert gather_token_rows(ours) == 2  # the embedding's and the lm_head's layer (tied or not)
    batch = toy.batch(ours.base_model.model.config, text_after=6)
    batch["input_ids"][:, -5:-1] = torch.tensor(NEW)  # the new tokens appear before the last input position
    outs = []
    for model in (ref, ours):
        out = model(**batch, labels=batch["input_ids"])
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits)
    grads = {}
    for model in (ref, ours):
        for name, p in model.named_parameters():
            if p.requires_grad:
                grads.setdefault(name, []).append(p.grad)
    deltas = [n for n in grads if "trainable_tokens_delta" in n]
    assert len(deltas) == (1 if tied else 2)
    for name, (g_ref, g_ours) in grads.items():
        torch.testing.assert_close(g_ours, g_ref, msg=name)
    for name in deltas:
        assert grads[name][1].abs().sum(-1).gt(0).all(), name  # every new row got a gradient
    embed = ours.base_model.model.model.language_model.embed_tokens
    assert isinstance(embed.token_adapter, GatheredTrainableTokensLayer)
    assert embed.token_adapter.base_layer.weight.grad is None  # the frozen matrix gets none


def test_merged_weights_match_the_forward(toy):
    model = _peft(toy, tied=True)
    gather_token_rows(model)
    batch = toy.batch(model.base_model.model.config)
    batch["input_ids"][:, -2:] = torch.tensor(NEW[:2])
    with torch.no_grad():
        before = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
