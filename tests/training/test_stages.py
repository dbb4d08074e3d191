"""Per-stage trainable parameters: the exact set, a finite gradient for each, frozen ones unchanged."""
from __future__ import annotations

import re

import pytest
import torch
from toy_family import NEW_TOKENS, VOCAB, ToyConfig, ToyDataset, ToyFamily, ToyModel, collate, toy_experiment

from reasonknee3d.training.stages import lora_target_regex, setup_trainable, trainable_parameter_names

PROJECTOR = [f"model.projector.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")]
LORA = [f"base_model.model.model.language_model.layers.{layer}.self_attn.{proj}.lora_{ab}.default.weight"
        for layer in (0, 1) for proj in ("q_proj", "v_proj") for ab in ("A", "B")]
PEFT_PROJECTOR = [f"base_model.model.model.projector.modules_to_save.default.{i}.{k}"
                  for i in (0, 2) for k in ("weight", "bias")]
EMBED_ROWS = "base_model.model.model.language_model.embed_tokens.token_adapter.trainable_tokens_delta.default"
HEAD_ROWS = "base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"


def _setup(tie: bool = False, **train):
    torch.manual_seed(0)
    model = ToyModel(ToyConfig(tie_word_embeddings=tie))
    exp = toy_experiment("unused", **train)
    return setup_trainable(model, exp.train, ToyFamily().module_paths(model), NEW_TOKENS)


def _lm_params(prefix: str = "") -> list[str]:
    model = ToyModel(ToyConfig())
    return [prefix + n for n, _ in model.named_parameters() if n.startswith(("model.language_model.", "lm_head."))]


CASES = {
    "alignment": (dict(stage="alignment"), ["model.encoder.weight", "model.encoder.bias", *PROJECTOR]),
    "instruction": (dict(stage="instruction"), [*LORA, *PEFT_PROJECTOR, EMBED_ROWS, HEAD_ROWS]),
    "instruction+encoder": (dict(stage="instruction", encoder="full"),
                            [*LORA, *PEFT_PROJECTOR, EMBED_ROWS, HEAD_ROWS,
                             *(f"base_model.model.model.encoder.modules_to_save.default.{k}"
                               for k in ("weight", "bias"))]),
    "lm-full": (dict(stage="instruction", language_model="full", new_token_rows=False),
                [*PROJECTOR, *_lm_params()]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exact_trainable_set_finite_grads_and_frozen_unchanged(case: str) -> None:
    train, expected = CASES[case]
    model = _setup(**train)
    assert sorted(trainable_parameter_names(model)) == sorted(expected)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model(**collate([ToyDataset()[i] for i in range(4)])).loss
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        if not p.requires_grad:
            assert not changed, f"frozen {name} changed"
        elif p.grad.abs().sum() > 0:
            assert changed, f"trainable {name} did not change"


@pytest.mark.parametrize("tie", [False, True])
def test_only_new_token_rows_change(tie: bool) -> None:
    model = _setup(tie=tie)
    names = trainable_parameter_names(model)
    assert (HEAD_ROWS in names) is (not tie)  # a tied head trains through the embedding's rows
    embed = model.get_input_embeddings()
    ids = torch.arange(VOCAB)[None]
    before = embed(ids).detach().clone()
    model(**collate([ToyDataset()[i] for i in range(8)])).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    changed = (embed(ids).detach() != before).any(-1)[0]
    assert changed.nonzero().flatten().tolist() == NEW_TOKENS


def test_lora_regex_is_anchored_on_the_language_model() -> None:
    regex = lora_target_regex(["model.language_model"], ["gate_proj", "q_proj"])
    assert re.fullmatch(regex, "model.language_model.layers.0.mlp.gate_proj")
    assert re.fullmatch(regex, "model.language_model.layers.11.self_attn.q_proj")
    assert not re.fullmatch(regex, "model.visual.blocks.0.mlp.gate_proj")
    assert not re.fullmatch(regex, "model.language_model.layers.0.mlp.gate_proj.lora_A")


def test_unknown_module_path_is_named() -> None:
    model = ToyModel(ToyConfig())
    exp = toy_experiment("unused")
    with pytest.raises(ValueError, match="model.vision"):
        setup_trainable(model, exp.train, {"encoder": ["model.vision"], "projector": ["model.projector"],
                                           "language_model": ["model.language_model"]})
