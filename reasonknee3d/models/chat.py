"""Qwen chat-format encoding of one (prompt, answer) pair with loss labels, shared by both model families.

The conversation is rendered by the tokenizer's own chat template (the real Qwen2.5-VL template or the
tiny checkpoint's copy), so training sees exactly what generation sees:

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{media}{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

Only the answer tokens and the closing ``<|im_end|>`` carry labels; everything else is IGNORE_INDEX.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..constants import ENDOFTEXT, IGNORE_INDEX, IM_END


def _prefix_text(tokenizer, prompt: str, media: str, system: Optional[str]) -> str:
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": media + prompt})
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r} has no "
                         "chat template; expected a Qwen2.5-VL tokenizer (tokenizer_config / chat_template.jinja)")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_example(tokenizer, prompt: str, answer: Optional[str], media: str = "",
                   system: Optional[str] = None) -> dict[str, list[int]]:
    """Token ids and labels of one example in Qwen's chat format.

    ``media`` is the already-expanded media token string (placed before the prompt in the user turn).
    With ``answer=None`` the ids end with the generation prompt ``<|im_start|>assistant\\n`` and every
    label is IGNORE_INDEX. The prefix and the answer are tokenized separately so the answer tokens are
    the same whatever the prompt (no BPE merge across the boundary).
    """
    prefix = tokenizer(_prefix_text(tokenizer, prompt, media, system), add_special_tokens=False).input_ids
    if answer is None:
        return {"input_ids": list(prefix), "labels": [IGNORE_INDEX] * len(prefix)}
    target = tokenizer(answer + IM_END, add_special_tokens=False).input_ids
    tail = tokenizer("\n", add_special_tokens=False).input_ids
    ids = list(prefix) + list(target) + list(tail)
    labels = [IGNORE_INDEX] * len(prefix) + list(target) + [IGNORE_INDEX] * len(tail)
    return {"input_ids": ids, "labels": labels}


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids up to the first ``<|im_end|>`` / ``<|endoftext|>``, special tokens kept.

    Coordinate tokens are special tokens, so ``skip_special_tokens=True`` would drop the box; this keeps
    them for ``boxes.coord_tokens_to_text``.
    """
    stops = {tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)}
    out: list[int] = []
    for i in ids:
        if int(i) in stops:
            break
        out.append(int(i))
    return tokenizer.decode(out, skip_special_tokens=False).strip()


def pad_examples(rows: Sequence[dict], pad_id: int, left: bool) -> dict[str, "torch.Tensor"]:
    """Stack ``encode_example`` rows into ``input_ids`` / ``labels`` / ``attention_mask`` of one width.

    Left padding for generation (every row continues from its last position), right padding for training.
    """
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        cols = slice(width - n, width) if left else slice(0, n)
        ids[i, cols] = torch.tensor(r["input_ids"])
        labels[i, cols] = torch.tensor(r["labels"])
        mask[i, cols] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
