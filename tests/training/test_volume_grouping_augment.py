"""The 3D family's training batches with train.volume_grouping > 1 and augmentation on: one draw per volume, so the
questions of one volume keep one input (``volume_index``) and the model's loss is that of the rows ungrouped."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reasonknee3d.data.dataset import VolumeAugment
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.families import get_family, load_experiment_config

AUGMENT = ["data.augment_prob=1.0", "data.zoom_range=[1.2,1.3]", "model.language_model.tiny.num_hidden_layers=1",
           "train.dataloader_num_workers=0", "train.report_to=[]"]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release")
    write_synthetic_release(root, n_volumes=2, shape=(16, 32, 32), seed=0, questions=[1, 2, 30, 44])
    return root


def _setup(release: Path, grouping: int):
    exp = load_experiment_config("tiny_3d", [*AUGMENT, f"train.data_dir={release}",
                                             f"train.volume_grouping={grouping}"])
    family = get_family("3d")
    model, processor = family.build(exp, "sdpa")
    dataset, collate = family.train_data(exp, model, processor)
    first = dataset.samples[0].image_path
    rows = [i for i, s in enumerate(dataset.samples) if s.image_path == first][:4]
    assert len(rows) == 4
    return model, processor, dataset, collate, [dataset[i] for i in rows]


def test_grouped_batch_holds_one_augmented_volume_and_the_loss_of_the_rows_ungrouped(release: Path) -> None:
    model, processor, dataset, collate, items = _setup(release, grouping=4)
    assert dataset.augment is None and isinstance(dataset.volume_augment, VolumeAugment)
    torch.manual_seed(0)
    batch = collate(items)
    assert batch["volume_index"].tolist() == [0, 0, 0, 0] and batch["volumes"].shape[0] == 1

    # The batch is the processor's encoding of the items under one per-volume draw (a fresh augmenter, same seed):
    # every row's answer carries its own box moved by that draw.
    torch.manual_seed(0)
    want, _ = VolumeAugment(dataset.cache.cfg)(items)
    assert all(w["answer"] != it["answer"] for w, it in zip(want, items) if it["box"] is not None)
    assert any(it["box"] is not None for it in items)
    ref = processor([w["volume"] for w in want], [w["prompt"] for w in want], [w["answer"] for w in want],
                    orig_shapes=[w["orig_shape"] for w in want])
    assert torch.equal(batch["input_ids"], ref["input_ids"]) and torch.equal(batch["labels"], ref["labels"])
    torch.testing.assert_close(batch["volumes"][0], want[0]["volume"].to(batch["volumes"].dtype), rtol=0, atol=0)

    model.eval()
    calls = []
    model.model.encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        grouped = model(**batch).loss
        assert calls[0] == 1  # the whole volume encoded once for the four rows
        calls.clear()
        ungrouped = {k: v for k, v in batch.items() if k != "volume_index"}
        ungrouped["volumes"] = batch["volumes"][batch["volume_index"]]
        repeated = model(**ungrouped).loss
        assert calls[0] == 4
    assert torch.isfinite(grouped)
    torch.testing.assert_close(grouped, repeated)


def test_without_grouping_each_item_is_augmented_on_its_own(release: Path) -> None:
    _, _, dataset, collate, items = _setup(release, grouping=1)
    assert dataset.volume_augment is None and dataset.augment is not None
    assert all(it["volume"].dtype == torch.float32 for it in items)  # augmented in __getitem__, as before
    batch = collate(items)
    assert "volume_index" not in batch and batch["volumes"].shape[0] == 4
    assert not torch.equal(batch["volumes"][0], batch["volumes"][1])  # four draws
