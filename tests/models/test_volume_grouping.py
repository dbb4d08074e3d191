"""Questions about the same volume in one batch: the encoder runs once per distinct volume (``volume_index``)."""
from __future__ import annotations

import torch

from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration

COORDS = list(range(101, 117))
BOX_START, BOX_END = 120, 121


def test_grouped_batch_gives_the_loss_and_gradients_of_the_repeated_batch(toy):
    cfg = toy.config(region_size=[4, 8, 8], coord_token_ids=COORDS, box_start_token_id=BOX_START,
                     box_end_token_id=BOX_END)
    batch = toy.batch(cfg, batch=4)
    boxes = torch.tensor([[BOX_START, 101, 109, 102, 112, 104, 115, BOX_END],
                          [BOX_START, 101, 103, 104, 104, 108, 115, BOX_END],
                          [BOX_START, 102, 110, 101, 105, 103, 113, BOX_END],
                          [BOX_START, 101, 106, 103, 111, 102, 114, BOX_END]])
    ids = torch.cat([batch["input_ids"], boxes, torch.tensor([[7, 8]] * 4)], dim=1)
    distinct = batch["volumes"][:2]
    index = torch.tensor([0, 1, 1, 0])  # rows 0 and 3 ask about one volume, rows 1 and 2 about the other
    torch.manual_seed(0)
    model = ReasonKnee3DForConditionalGeneration(cfg).train()
    calls = []
    model.model.encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))

    def run(**inputs):
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, **inputs)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_rep, grads_rep = run(volumes=distinct[index])
    assert calls == [4, 4]  # whole volumes, then one crop per box
    calls.clear()
    loss_grp, grads_grp = run(volumes=distinct, volume_index=index)
    assert calls == [2, 4]  # each distinct volume once; crops are per box
    torch.testing.assert_close(loss_grp, loss_rep)
    assert grads_grp.keys() == grads_rep.keys() and any(n.startswith("model.encoder.") for n in grads_grp)
    for name in grads_rep:
        torch.testing.assert_close(grads_grp[name], grads_rep[name], rtol=1e-4, atol=1e-6, msg=name)
