"""A release whose volumes live elsewhere (paths from another machine) and whose folder must not be written:
``--images`` finds the volumes by name, ``--cache-dir`` puts every cache outside the release."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from reasonknee3d import cli
from reasonknee3d.data.synth import write_synthetic_release
from reasonknee3d.families import get_family, load_experiment_config

SCRIPT = Path(__file__).parents[2] / "scripts" / "make_release_variants.py"
_spec = importlib.util.spec_from_file_location("make_release_variants", SCRIPT)
variants = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(variants)

TINY_LM = '{"hidden_size": 32, "intermediate_size": 64, "bpe_vocab_size": 300}'


def _listing(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def test_preprocess_train_and_predict_with_images_and_cache_dir(tmp_path: Path) -> None:
    src = tmp_path / "synth"
    write_synthetic_release(src, 4, (16, 32, 32), seed=1, questions=[1, 30])
    images = tmp_path / "converted"
    release = variants.foreign_paths(src, tmp_path / "release", images)
    cache = tmp_path / "cache"
    before = _listing(release)

    # Without --images every volume is a path from another machine: nothing usable.
    assert cli.main(["preprocess", "--data", str(release), "--config", "tiny_3d", "--cache-dir", str(cache)]) == 1
    assert cli.main(["preprocess", "--data", str(release), "--config", "tiny_3d", "--images", str(images),
                     "--cache-dir", str(cache)]) == 0
    assert len(list((cache / "volumes").glob("*.npy"))) == 4

    overrides = [f"model.language_model.tiny={TINY_LM}", "model.region_size=null"]
    exp = load_experiment_config("tiny_3d", overrides)
    assert cli.main(["train", "--config", "tiny_3d", "--data", str(release), "--images", str(images),
                     "--cache-dir", str(cache), "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
                     "train.dataloader_num_workers=0", "train.report_to=[]", *overrides]) == 0
    saved = json.loads(json.dumps(load_experiment_config(tmp_path / "run" / "config.yaml").to_dict()))
    assert saved["data"]["images"] == str(images) and saved["data"]["cache_dir"] == str(cache)

    model = get_family(exp.family).init(exp, tmp_path / "model")
    out = tmp_path / "p.jsonl"
    assert cli.main(["predict", "--model", str(model), "--data", str(release), "--split", "test", "--out", str(out),
                     "--limit", "2", "--max-new-tokens", "4", "--unconstrained", "--images", str(images),
                     "--cache-dir", str(cache)]) == 0
    assert len(out.read_text().splitlines()) == 2
    assert _listing(release) == before  # nothing written, changed or cached inside the release
