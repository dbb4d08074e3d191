"""Region look (models/reasonknee3d/region.py): crops, box detection in token ids, and the model path through <|box_end|>."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from reasonknee3d.models.reasonknee3d.configuration_reasonknee3d import ReasonKnee3DConfig
from reasonknee3d.models.reasonknee3d.configuration_reasonknee3d import ReasonKnee3DModelArgs
from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import ReasonKnee3DForConditionalGeneration
from reasonknee3d.models.reasonknee3d.region import box_end_bins, crop_regions, spread_regions

# Toy vocabulary (tests/models/conftest.py uses 100 for <|volume_pad|>): 16 coordinate tokens, box delimiters.
COORDS = list(range(101, 117))
BOX_START, BOX_END = 120, 121
REGION = [4, 8, 8]  # toy patch 2 x 8 x 8 -> 2 x 1 x 1 region patches


def _region_config(toy, region_size=REGION) -> ReasonKnee3DConfig:
    return toy.config(region_size=region_size, coord_token_ids=COORDS, box_start_token_id=BOX_START,
                      box_end_token_id=BOX_END)


def _box_tokens(bins) -> list[int]:
    return [BOX_START, *(COORDS[b] for b in bins), BOX_END]


def _batch_with_box(toy, cfg, bins=((1, 9, 2, 12, 0, 15), (0, 3, 4, 4, 8, 15))) -> dict[str, torch.Tensor]:
    """The toy batch with a box written after the volume in every row, then two more text tokens."""
    batch = toy.batch(cfg)
    box = torch.tensor([_box_tokens(b) for b in bins])
    batch["input_ids"] = torch.cat([batch["input_ids"], box, torch.tensor([[7, 8]] * len(bins))], dim=1)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return batch


def _model(cfg) -> ReasonKnee3DForConditionalGeneration:
    torch.manual_seed(0)
    return ReasonKnee3DForConditionalGeneration(cfg).eval()


# --- crop_regions -------------------------------------------------------------------------------------------

def test_crop_of_the_whole_volume_at_its_own_size_is_the_volume():
    vol = torch.randn(2, 1, 4, 6, 8)
    bins = torch.tensor([[0, 7, 0, 7, 0, 7]] * 2)  # K = 8: every axis covered fully
    torch.testing.assert_close(crop_regions(vol, bins, 8, (4, 6, 8)), vol)


def test_crop_with_one_bin_per_voxel_is_exactly_the_boxed_voxels():
    vol = torch.arange(8 * 8 * 8, dtype=torch.float32).reshape(1, 1, 8, 8, 8)
    # K = 8 on 8-voxel axes: bin k is voxel k; box slices 2..5, rows 0..1, columns 3..6 (inclusive).
    out = crop_regions(vol, torch.tensor([[2, 5, 0, 1, 3, 6]]), 8, (4, 2, 4))
    torch.testing.assert_close(out, vol[:, :, 2:6, 0:2, 3:7])


def test_crop_resamples_a_box_to_the_region_size():
    # Along axis 2 the volume is 0, 1, ..., 7; a box over voxels 4..7 sampled at 2 cell centres reads the
    # centres of voxel pairs (4, 5) and (6, 7): 4.5 and 6.5.
    vol = torch.arange(8, dtype=torch.float32).expand(1, 1, 2, 2, 8).contiguous()
    out = crop_regions(vol, torch.tensor([[0, 7, 0, 7, 4, 7]]), 8, (2, 2, 2))
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor([4.5, 6.5]))


# --- box_end_bins -------------------------------------------------------------------------------------------

def _bin_of_id() -> torch.Tensor:
    lookup = torch.full((128,), -1, dtype=torch.long)
    lookup[torch.tensor(COORDS)] = torch.arange(16)
    return lookup


def test_box_end_bins_finds_closed_boxes_and_skips_a_bare_box_end():
    ids = torch.tensor([[5, 5, 5, 5, 5, 5, *_box_tokens([1, 2, 3, 4, 5, 6]), 9, BOX_END],
                        [BOX_END, 5, 5, 5, 5, 5, 5, 5, *_box_tokens([0, 15, 7, 7, 2, 3])]])
    rows, cols, bins = box_end_bins(ids, BOX_END, _bin_of_id())
    assert rows.tolist() == [0, 1] and cols.tolist() == [13, 15]
    assert bins.tolist() == [[1, 2, 3, 4, 5, 6], [0, 15, 7, 7, 2, 3]]


def test_box_end_bins_reads_the_coordinates_from_the_context_in_a_cached_step():
    full = torch.tensor([[5, 6, *_box_tokens([1, 2, 3, 4, 5, 6])]])
    rows, cols, bins = box_end_bins(full[:, -1:], BOX_END, _bin_of_id(), context=full)
    assert rows.tolist() == [0] and cols.tolist() == [0] and bins.tolist() == [[1, 2, 3, 4, 5, 6]]


# --- spread_regions ----------------------------------------------------------------------------------------

def test_spread_gives_each_position_the_latest_box_or_the_carried_feature():
    carried = torch.tensor([[0.0], [9.0]])  # row 0 has no box yet, row 1 carries 9 from earlier steps
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([1, 3, 2])
    features = torch.tensor([[1.0], [2.0], [3.0]])
    added, last = spread_regions(rows, cols, features, 5, carried)
    assert added[..., 0].tolist() == [[0, 1, 1, 2, 2], [9, 9, 3, 3, 3]]
    assert last[:, 0].tolist() == [2, 3]


def test_spread_without_boxes_in_the_call_keeps_the_carried_feature():
    carried = torch.tensor([[4.0, 5.0]])
    added, last = spread_regions(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                                 torch.zeros(0, 2), 3, carried)
    assert torch.equal(added, carried[:, None].expand(1, 3, 2)) and torch.equal(last, carried)


# --- the model ----------------------------------------------------------------------------------------------

def test_region_feature_changes_the_sequence_from_box_end_on_only(toy):
    cfg = _region_config(toy)
    model = _model(cfg)
    batch = _batch_with_box(toy, cfg)
    blind = copy.deepcopy(model)
    blind.model.region_projector = None  # the same weights without the region look
    with torch.no_grad():
        a, b = model(**batch).logits, blind(**batch).logits
    end = int((batch["input_ids"][0] == BOX_END).nonzero()[0, 0])
    torch.testing.assert_close(a[:, :end], b[:, :end])
    assert not torch.allclose(a[:, end:], b[:, end:])


def test_region_feature_reads_the_volume_inside_the_box(toy):
    cfg = _region_config(toy)
    model = _model(cfg)
    batch = _batch_with_box(toy, cfg, bins=[(0, 7, 0, 7, 0, 7)] * 2)  # box = first half of every axis
    changed = {**batch, "volumes": batch["volumes"].clone()}
    changed["volumes"][:, :, 4:, 8:, 8:] += 5.0  # outside the box only
    with torch.no_grad():
        base, _ = model.model.add_region_features(batch["input_ids"], torch.zeros(2, batch["input_ids"].shape[1], 32),
                                               batch["volumes"])
        same, _ = model.model.add_region_features(batch["input_ids"], torch.zeros(2, batch["input_ids"].shape[1], 32),
                                               changed["volumes"])
    torch.testing.assert_close(base, same)
    assert base.abs().sum() > 0


def test_backward_reaches_every_parameter_with_the_region_look(toy):
    cfg = _region_config(toy)
    model = _model(cfg).train()
    batch = _batch_with_box(toy, cfg)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_a_batch_without_boxes_still_gives_the_region_projector_a_gradient(toy):
    # DDP needs a gradient for every parameter on every rank, whether or not its batch has a box.
    cfg = _region_config(toy)
    model = _model(cfg).train()
    batch = toy.batch(cfg)
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for p in model.model.region_projector.parameters())


def test_cached_steps_through_and_after_box_end_match_the_full_forward(toy):
    cfg = _region_config(toy)
    model = _model(cfg)
    batch = _batch_with_box(toy, cfg)
    ids = batch["input_ids"]
    end = int((ids[0] == BOX_END).nonzero()[0, 0])
    with torch.no_grad():
        full = model(input_ids=ids, volumes=batch["volumes"]).logits
        out = model(input_ids=ids[:, :end], volumes=batch["volumes"], use_cache=True)
        assert not out.region_embeds.any()  # no box closed yet
        steps = []
        for col in range(end, ids.shape[1]):  # <|box_end|>, then two tokens that get the carried feature
            # Only the step that closes the box needs the volumes; later steps use the carried feature alone.
            volumes = batch["volumes"] if col == end else None
            out = model(input_ids=ids[:, col:col + 1], past_key_values=out.past_key_values, use_cache=True,
                        region_volumes=volumes, context_ids=ids[:, :col + 1], region_embeds=out.region_embeds)
            steps.append(out.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, end:], atol=1e-5, rtol=1e-4)


class _ForceBoxEnd(LogitsProcessor):
    """Forces <|box_end|> as the first generated token (the prompt ends inside a box); never <|volume_pad|>."""

    def __init__(self, prompt_len: int) -> None:
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == self.prompt_len:
            scores[:] = -float("inf")
            scores[:, BOX_END] = 0.0
        scores[:, 100] = -float("inf")  # a generated placeholder would have no volume feature
        return scores


def test_kv_cache_generation_with_a_generated_box_matches_uncached_generation(toy):
    cfg = _region_config(toy)
    model = _model(cfg)
    batch = _batch_with_box(toy, cfg)
    end = int((batch["input_ids"][0] == BOX_END).nonzero()[0, 0])
    prompt = {"input_ids": batch["input_ids"][:, :end], "attention_mask": batch["attention_mask"][:, :end],
              "volumes": batch["volumes"]}
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None,
              logits_processor=LogitsProcessorList([_ForceBoxEnd(end)]))
    cached = model.generate(**prompt, use_cache=True, **kw)
    uncached = model.generate(**prompt, use_cache=False, **kw)
    assert (cached[:, end] == BOX_END).all()
    assert torch.equal(cached, uncached)


def test_save_and_load_keep_the_region_look(toy, tmp_path):
    cfg = _region_config(toy)
    model = _model(cfg)
    model.save_pretrained(tmp_path)
    loaded = ReasonKnee3DForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.region_size == REGION and loaded.model.region_projector is not None
    batch = _batch_with_box(toy, cfg)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_region_look_needs_one_volume_per_row(toy):
    cfg = _region_config(toy)
    model = _model(cfg)
    batch = _batch_with_box(toy, cfg)
    embeds = torch.zeros(2, batch["input_ids"].shape[1], 32)
    with pytest.raises(ValueError, match="one volume per row .* got 1 volumes for 2 rows"):
        model.model.add_region_features(batch["input_ids"], embeds, batch["volumes"][:1])
    with pytest.raises(ValueError, match="got no volumes for 2 rows"):
        model.model.add_region_features(batch["input_ids"], embeds, None)


def test_region_size_not_divisible_by_the_patch_is_an_error(toy):
    with pytest.raises(ValueError, match=r"region_size \[4, 8, 6\] must be divisible .*\[2, 8, 8\]"):
        _region_config(toy, region_size=[4, 8, 6])
    model = {"language_model": {"tiny": {}}, "encoder": {"patch_size": [4, 16, 16]}, "region_size": [8, 30, 32]}
    with pytest.raises(ValueError, match=r"model.region_size \[8, 30, 32\]"):
        ReasonKnee3DModelArgs(**model).from_qwen_kwargs([32, 64, 64])
    kwargs = ReasonKnee3DModelArgs(**{**model, "region_size": 16}).from_qwen_kwargs([32, 64, 64])
    assert kwargs["region_size"] == [16, 16, 16]
