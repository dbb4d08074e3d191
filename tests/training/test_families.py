"""Both real families through the command line: train (LoRA), checkpoint folders, merge, predict, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from reasonknee3d.boxes import voxel_text_to_coord_tokens
from reasonknee3d.cli import main
from reasonknee3d.constants import IGNORE_INDEX, IM_END
from reasonknee3d.data.io import load_volume
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.parsing import parse_output
from reasonknee3d.evaluation.predict import predict
from reasonknee3d.schema import get_question
from reasonknee3d.training.checkpoints import has_adapter
from reasonknee3d.families import load_experiment_config
from reasonknee3d.families import family_of_model_dir

import reasonknee3d

PRESETS = Path(reasonknee3d.__file__).parent / "configs"
CONFIGS = PRESETS
# Instruction stage as in the real-size configs: LoRA on the LM, new coordinate-token rows, merged at the end.
LORA = ["train.language_model=lora", "train.new_token_rows=true", "train.merge=true", "train.logging_steps=1",
        "train.per_device_batch_size=2", "train.dataloader_num_workers=0", "train.report_to=[]"]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release")
    write_synthetic_release(root, n_volumes=4, shape=(24, 48, 48), seed=0, questions=[1, 2, 30, 44])
    return root


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow  # 10-15 s per family on 2 shared cores (tiny LM build, 2 steps, 5 generations)
@pytest.mark.parametrize("config", ["tiny_3d.yaml", "tiny_slice.yaml"])
def test_train_predict_resume(tmp_path: Path, release: Path, config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a stray relative path lands in the test folder
    run = tmp_path / "run"
    assert main(["train", "--config", str(CONFIGS / config), "--data", str(release), "--output-dir", str(run),
                 "--max-steps", "2", *LORA]) == 0
    metrics = _rows(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    assert has_adapter(run / "final") and not has_adapter(run / "merged")
    _check_loss_only_on_answers(run)

    # The LoRA folder (base + embedded adapter) and the merged one generate the same greedy answers.
    out_final, out_merged = tmp_path / "final.jsonl", tmp_path / "merged.jsonl"
    res = predict(run / "final", release, "test", out_final, batch_size=2, limit=2, max_new_tokens=160)
    assert (res.n_written, res.n_skipped) == (2, 0)
    predict(run / "merged", release, "test", out_merged, batch_size=2, limit=2, max_new_tokens=160)
    assert [r["output"] for r in _rows(out_final)] == [r["output"] for r in _rows(out_merged)]
    for row in _rows(out_final):
        parsed = parse_output(row["output"], get_question(row["question_id"]))
        assert parsed.severity_found and None not in parsed.severity.values()  # constrained decoding

    # Rerunning with a larger limit only generates what is missing.
    res = predict(run / "final", release, "test", out_final, batch_size=2, limit=3, max_new_tokens=160)
    assert (res.n_written, res.n_skipped) == (1, 2)
    assert len({r["sample_id"] for r in _rows(out_final)}) == 3


def _check_loss_only_on_answers(run: Path) -> None:
    """The family's training batch labels exactly the answer (coordinate tokens) + <|im_end|>, nothing else."""
    family = family_of_model_dir(run / "final")
    model, processor = family.load(run / "final", "sdpa")
    dataset, collate = family.train_data(load_experiment_config(run / "config.yaml"), model, processor)
    items = [dataset[i] for i in range(2)]
    batch = collate(items)
    tokenizer = processor.tokenizer
    for row, item in enumerate(items):
        if isinstance(item, dict):  # 3D: VolumeQADataset item
            answer, shape = item["answer"], item["orig_shape"]
        else:  # slice: data-layer Sample; boxes refer to the loaded volume's shape
            answer, shape = item.answer, load_volume(item.image_path)[1].shape
        labels = batch["labels"][row]
        labelled = tokenizer.decode(labels[labels != IGNORE_INDEX].tolist())
        assert labelled == voxel_text_to_coord_tokens(answer, shape, family.num_bins(model)) + IM_END
        # Labels are the input ids themselves (transformers shifts them inside the loss).
        ids = batch["input_ids"][row][labels != IGNORE_INDEX]
        assert torch.equal(ids, labels[labels != IGNORE_INDEX])



@pytest.mark.parametrize("config", ["tiny_3d.yaml", "tiny_slice.yaml"])
def test_answer_only_logits_give_the_same_loss_and_gradients(tmp_path: Path, release: Path, config: str) -> None:
    from reasonknee3d.families import get_family
    from reasonknee3d.training.losses import answer_logits_only, takes_logits_to_keep

    exp = load_experiment_config(CONFIGS / config, [f"train.data_dir={release}", f"train.output_dir={tmp_path}"])
    family = get_family(exp.family)
    torch.manual_seed(0)
    model, processor = family.build(exp, "sdpa")
    dataset, collate = family.train_data(exp, model, processor)
    batch = collate([dataset[i] for i in range(3)])
    assert takes_logits_to_keep(model)  # so the trainer and the bench cut its logits
    cut = answer_logits_only(batch)
    assert 0 < cut["logits_to_keep"] < batch["labels"].shape[1]  # the volume and the prompt are cut off

    def loss_and_grad(b: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.zero_grad()
        out = model(**b)
        out.loss.backward()
        return out.loss.detach(), out.logits.shape[1], model.get_output_embeddings().weight.grad.clone()

    full_loss, full_len, full_grad = loss_and_grad(batch)
    loss, kept, grad = loss_and_grad(cut)
    assert full_len == batch["labels"].shape[1] and kept == cut["logits_to_keep"]
    torch.testing.assert_close(loss, full_loss)
    torch.testing.assert_close(grad, full_grad)
    # Nothing to cut: a batch without labels, or one that already chooses its logits, is left alone.
    assert answer_logits_only({k: v for k, v in batch.items() if k != "labels"}).keys() == batch.keys() - {"labels"}
    assert answer_logits_only({**batch, "logits_to_keep": 1})["labels"] is batch["labels"]
