"""Memory and time of one forward through the trainable rows of added tokens: peft's layer vs ``token_rows``.

Qwen2.5-VL-3B sizes by default: a tied 151,936 x 2,048 bfloat16 embedding / lm_head with 384 trainable coordinate
rows (float32, as training keeps them). Two passes are timed: a decoding step (one token in, its logits out) and a
training forward (``--length`` tokens in, logits for the last ``--answer`` of them, with backward).
"Allocated" counts the bytes of every tensor the forward (and backward) creates, from a torch dispatch hook, so it
is exact and the same on CPU and GPU.

    python scripts/measure_token_rows.py [--vocab 151936 --hidden 2048 --rows 384 --length 600 --answer 120]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from reasonknee3d.models.token_rows import gather_token_rows


class AllocatedBytes(TorchDispatchMode):
    """Sums the storage bytes of every tensor an op returns (views share storage and are counted once; views of
    ``existing`` tensors, e.g. a transposed weight, are not allocations)."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.total, self.largest = 0, 0
        self._seen = {t.untyped_storage().data_ptr() for t in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if torch.is_tensor(t):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self._seen:
                    self._seen.add(ptr)
                    n = t.untyped_storage().nbytes()
                    self.total, self.largest = self.total + n, max(self.largest, n)
        return out


def build(vocab: int, hidden: int, rows: int, gathered: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    embed = nn.Embedding(vocab, hidden, dtype=torch.bfloat16).requires_grad_(False)
    head = nn.Linear(hidden, vocab, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    head.weight = embed.weight  # tied, as in Qwen2.5-VL-3B
    ids = list(range(vocab - rows, vocab))
    emb_layer = TrainableTokensLayer(embed, "default")
    emb_layer.update_layer("default", token_indices=ids)
    emb_layer.trainable_tokens_delta["default"].data = emb_layer.trainable_tokens_delta["default"].data.float()
    head_layer = TrainableTokensLayer(head, "default", tied_adapter=emb_layer)
    holder = nn.ModuleList([emb_layer, head_layer])
    if gathered:
        gather_token_rows(holder)
    return emb_layer, head_layer


def run(emb: nn.Module, head: nn.Module, ids: torch.Tensor, answer: int, backward: bool) -> None:
    h = emb(ids)
    logits = head(h[:, -answer:])
    if backward:
        logits.float().logsumexp(-1).mean().backward()


def measure(emb, head, ids, answer, backward, repeats) -> dict[str, float]:
    run(emb, head, ids, answer, backward)  # warm-up
    existing = [*emb.parameters(), *emb.buffers(), *head.parameters(), *head.buffers(), ids]
    with AllocatedBytes(existing) as counter:
        run(emb, head, ids, answer, backward)
    start = time.perf_counter()
    for _ in range(repeats):
        run(emb, head, ids, answer, backward)
    return {"ms_per_forward": round(1000 * (time.perf_counter() - start) / repeats, 2),
            "allocated_mb": round(counter.total / 2**20, 1), "largest_tensor_mb": round(counter.largest / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=384)
    parser.add_argument("--length", type=int, default=600)
    parser.add_argument("--answer", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    # Some input tokens are new ones, as in an answer that writes a box.
    train_ids = torch.randint(0, args.vocab, (1, args.length), generator=g)
    train_ids[0, -20:-14] = torch.arange(args.vocab - args.rows, args.vocab - args.rows + 6)
    step_ids = torch.tensor([[args.vocab - 1]])
    report = {}
    for name, gathered in (("peft", False), ("token_rows", True)):
        emb, head = build(args.vocab, args.hidden, args.rows, gathered)
        report[name] = {"decode_step": measure(emb, head, step_ids, 1, False, args.repeats),
                        "train_forward_backward": measure(emb, head, train_ids, args.answer, True, args.repeats)}
        del emb, head
    print(json.dumps({"sizes": vars(args), **report}, indent=1))


if __name__ == "__main__":
    main()
