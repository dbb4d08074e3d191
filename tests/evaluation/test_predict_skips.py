"""predict skips a sample it cannot load or preprocess, lists it, predicts the rest and exits non-zero."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from reasonknee3d.cli import main
from reasonknee3d.data.dataset import VolumeQADataset
from reasonknee3d.data.release import iter_samples
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.models import save_model_dir
from reasonknee3d.models.reasonknee3d.modeling_reasonknee3d import build_reasonknee3d
from reasonknee3d.families.threed import ReasonKnee3DFamily

SHAPE = (16, 32, 32)


def test_bad_volumes_are_skipped_listed_and_retried(tmp_path: Path, monkeypatch, capsys) -> None:
    release = tmp_path / "release"
    write_synthetic_release(release, n_volumes=6, shape=SHAPE, seed=0, questions=[1, 2])
    model, processor = build_reasonknee3d(
        {"language_model": {"tiny": {"hidden_size": 32, "intermediate_size": 64, "bpe_vocab_size": 300}},
         "encoder": {"patch_size": [4, 8, 8], "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 32},
         "projector": {"projector_type": "pool3d_mlp", "pool_kernel": [1, 2, 2]}, "num_bins": 32},
        {"input_shape": list(SHAPE)})
    model_dir = save_model_dir(model, processor, tmp_path / "model")
    monkeypatch.setattr(ReasonKnee3DFamily, "decode", lambda self, m, p, generated, shapes: ["answer"] * len(shapes))
    samples = list(iter_samples(release, "train"))
    volumes = list(dict.fromkeys(s.volume_id for s in samples))
    assert len(volumes) >= 3
    # Volume 0 is cut short after its header (a partial download): the release reader still reads its shape,
    # preprocessing fails to load the voxels, and the family leaves its samples out.
    broken = Path(next(s.image_path for s in samples if s.volume_id == volumes[0]))
    raw = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(raw[:len(raw) // 2]))
    # One sample of volume 1 fails when its item is loaded (e.g. an unreadable cache entry).
    bad_item = next(s.sample_id for s in samples if s.volume_id == volumes[1])
    real_getitem = VolumeQADataset.__getitem__

    def getitem(self, index):
        if self.samples[index].sample_id == bad_item:
            raise OSError("cache entry unreadable")
        return real_getitem(self, index)
    monkeypatch.setattr(VolumeQADataset, "__getitem__", getitem)

    out = tmp_path / "p.jsonl"
    argv = ["predict", "--model", str(model_dir), "--data", str(release), "--split", "train", "--out", str(out),
            "--batch-size", "3", "--max-new-tokens", "2", "--unconstrained"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    on_broken = [s.sample_id for s in samples if s.volume_id == volumes[0]]
    n_skipped = len(on_broken) + 1
    assert f"{n_skipped} skipped (a rerun tries them again), listed in {tmp_path / 'p.skipped.jsonl'}" in err
    assert f"{len(on_broken)} x volume failed to load or preprocess (e.g. {on_broken[0]}" in err
    assert f"1 x OSError (e.g. {bad_item}): OSError: cache entry unreadable" in err
    listed = [json.loads(line) for line in (tmp_path / "p.skipped.jsonl").read_text().splitlines()]
    assert sorted(r["item"] for r in listed) == sorted([*on_broken, bad_item])
    assert all("preprocess_skipped.jsonl" in r["reason"] for r in listed if r["item"] in on_broken)
    written = {json.loads(line)["sample_id"] for line in out.read_text().splitlines()}
    assert written == {s.sample_id for s in samples} - set(on_broken) - {bad_item}

    # Once the item loads again, the rerun predicts it, still lists the broken volume, and exits 1.
    monkeypatch.setattr(VolumeQADataset, "__getitem__", real_getitem)
    assert main(argv) == 1
    assert "1 written" in capsys.readouterr().out
    listed = [json.loads(line)["item"] for line in (tmp_path / "p.skipped.jsonl").read_text().splitlines()]
    assert sorted(listed) == sorted(on_broken)
