"""Which parameters train: per-module frozen | lora | full, LoRA on the language model, new token rows.

A family names the modules behind each role (``encoder``, ``projector``, ``language_model``) as dotted
paths in its model. ``full`` makes a module trainable; ``lora`` wraps the model with peft, with target
layers matched by a regex anchored on the language model's path (Qwen's vision blocks reuse the names
``gate_proj/up_proj/down_proj``, so bare names would put LoRA on them too). Under peft, ``full`` modules
become ``modules_to_save`` and the rows of added tokens become ``trainable_token_indices``: the adapter
then holds everything that trained, which is what Trainer's resume and ``from_pretrained`` reload.

Every parameter that trains ends up float32 (``models.precision``): frozen weights keep the configured dtype,
and Trainer's ``bf16`` flag autocasts the arithmetic. The rows of added tokens use a layer that does not copy
the embedding matrix on each forward (``models.token_rows``).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..config import MODULE_ROLES, TrainConfig
from ..models.precision import keep_trainable_in_fp32
from ..models.token_rows import gather_token_rows

ModulePaths = Mapping[str, Sequence[str]]


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    """Dotted name of ``module`` inside ``model`` (None when absent)."""
    if module is None:
        return None
    return next((name for name, m in model.named_modules() if m is module), None)


def _resolve(model: nn.Module, paths: ModulePaths) -> dict[str, list[str]]:
    """Check every path exists; returns role -> paths."""
    names = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    for role in MODULE_ROLES:
        role_paths = list(paths.get(role, ()))
        missing = [p for p in role_paths if p not in names]
        if not role_paths or missing:
            raise ValueError(f"module paths for {role!r}: {missing or role_paths} not found in "
                             f"{type(model).__name__} (top-level modules: {[n for n, _ in model.named_children()]})")
        out[role] = role_paths
    return out


def _inside(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent + ".")


def lora_target_regex(language_model_paths: Sequence[str], targets: Sequence[str]) -> str:
    """peft ``target_modules`` regex (matched with re.fullmatch) for ``targets`` inside the language model."""
    roots = "|".join(re.escape(p) for p in language_model_paths)
    names = "|".join(re.escape(t) for t in targets)
    return rf"(?:{roots})\..*\.(?:{names})"


def setup_trainable(model: nn.Module, train: TrainConfig, module_paths: ModulePaths,
                    new_token_ids: Sequence[int] = ()) -> nn.Module:
    """Freeze/unfreeze/LoRA-wrap ``model`` as ``train`` asks; returns the model to train (maybe a PeftModel).

    ``module_paths`` maps each role to the dotted module names it covers (the language model role also
    lists ``lm_head`` so ``full`` trains the output layer). ``new_token_ids`` are the rows of added tokens,
    trained when ``train.new_token_rows`` is set. Trainable parameters are cast to float32.
    """
    paths = _resolve(model, module_paths)
    modes = train.modes()
    model.requires_grad_(False)
    # Shorter paths first, so a module nested in another role (e.g. a merger inside a vision tower)
    # gets its own role's mode last.
    for role in sorted(MODULE_ROLES, key=lambda r: min(len(p) for p in paths[r])):
        for path in paths[role]:
            model.get_submodule(path).requires_grad_(modes[role] == "full")
    if modes["language_model"] != "lora":
        keep_trainable_in_fp32(model)
        return model

    full = [p for role in MODULE_ROLES if modes[role] == "full" for p in paths[role]]
    frozen = [p for role in MODULE_ROLES if modes[role] == "frozen" for p in paths[role]]
    clash = [(f, p) for f in frozen for p in full if _inside(f, p)]
    if clash:
        raise ValueError(f"module {clash[0][0]!r} is frozen but lies inside {clash[0][1]!r}, which is full: with "
                         "LoRA, full modules are saved whole (peft modules_to_save), so they cannot keep a frozen part")
    token_rows: dict[str, list[int]] = {}
    if train.new_token_rows:
        if not new_token_ids:
            raise ValueError("train.new_token_rows is true but the family reported no added token ids")
        embed = model.get_input_embeddings()
        names = [_module_name(model, embed)]
        head = model.get_output_embeddings()
        # A tied lm_head shares the embedding matrix: peft trains its rows through the embedding wrapper.
        if head is not None and head.weight is not embed.weight:
            names.append(_module_name(model, head))
        token_rows = {name: sorted(int(i) for i in new_token_ids) for name in names if name is not None}
    config = LoraConfig(
        r=train.lora.r, lora_alpha=train.lora.alpha, lora_dropout=train.lora.dropout,
        target_modules=lora_target_regex(paths["language_model"], train.lora.targets),
        modules_to_save=full or None, trainable_token_indices=token_rows or None, bias="none")
    peft_model = get_peft_model(model, config)
    if not any("lora_" in n for n, _ in peft_model.named_parameters()):
        raise ValueError(f"train.lora.targets {train.lora.targets} matched no layer under {paths['language_model']}")
    # peft casts LoRA and token rows to float32 (autocast_adapter_dtype); the copies of full modules
    # (modules_to_save) keep the base dtype unless cast here.
    keep_trainable_in_fp32(peft_model)
    gather_token_rows(peft_model)
    return peft_model


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of parameters with ``requires_grad`` (as ``model.named_parameters`` spells them)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def describe_trainable(model: nn.Module) -> str:
    """One line: trainable / total parameters, and whether the model is a peft wrapper."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kind = "peft " if isinstance(model, PeftModel) else ""
    return f"{kind}trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"


def unwrap_base(model: nn.Module) -> nn.Module:
    """The transformers model inside a PeftModel (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model

