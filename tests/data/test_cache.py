"""Volume cache: keys, atomic entries, the preprocess batch command and its skipped list."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from reasonknee3d import cli
from reasonknee3d.data.cache import SKIPPED_FILE, CacheMiss, VolumeCache, preprocess_release
from reasonknee3d.data.transforms import PreprocessConfig, preprocess_volume

import reasonknee3d
from pathlib import Path

PRESETS = Path(reasonknee3d.__file__).parent / "configs"

CFG = PreprocessConfig(input_shape=(4, 6, 5))


def test_put_and_load_roundtrip(release, tmp_path):
    cache = VolumeCache(tmp_path / "cache", CFG)
    img = next(iter(release.images.values()))
    with pytest.raises(CacheMiss, match=r"not in the cache .* run `reasonknee3d preprocess` first"):
        cache.load(img)
    cache.put(img)
    arr, meta = cache.load(img)
    assert isinstance(arr, np.memmap) and arr.dtype == np.float16 and arr.shape == (4, 6, 5)
    expected, orig = preprocess_volume(img, CFG)
    np.testing.assert_allclose(arr, expected, atol=2e-3 * np.abs(expected).max())
    assert meta["orig_shape"] == list(orig) and meta["settings"] == CFG.array_settings()
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json", ".npy"]


def test_key_depends_on_array_settings_and_source_identity(release, tmp_path):
    img = next(iter(release.images.values()))
    key = VolumeCache(tmp_path, CFG).key(img)
    assert VolumeCache(tmp_path, PreprocessConfig(input_shape=(4, 6, 5), augment_prob=0.1)).key(img) == key
    assert VolumeCache(tmp_path, PreprocessConfig(input_shape=(4, 6, 6))).key(img) != key
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert VolumeCache(tmp_path, CFG).key(img) != key


def test_preprocess_release_writes_each_volume_once(release_factory, tmp_path):
    rel = release_factory(n_volumes=3)
    result = preprocess_release(rel.root, CFG, cache_dir=tmp_path / "c")
    assert result.ok and result.n_done == 3 and result.skipped_path is None
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(files) == 6 and not any(f.startswith(".") for f in files)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}
    again = preprocess_release(rel.root, CFG, cache_dir=tmp_path / "c")  # reused, not rewritten
    assert again.n_done == 3 and {p: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()} == mtimes


def test_preprocess_cli_skips_bad_volumes_and_exits_nonzero(release_factory, tiny, tmp_path, capsys):
    rel = release_factory(n_volumes=3)
    bad_nan, bad_const, _ = rel.images.values()
    img = tiny.make_image(0).astype(np.float32)
    img[1, 1, 1] = np.nan
    tiny.write_nifti(bad_nan, img)
    tiny.write_nifti(bad_const, np.zeros(tiny.SHAPE, np.int16))
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text("family: 3d\ndata:\n  input_shape: [4, 6, 5]\nmodel:\n  encoder: {patch_size: [2, 3, 5]}\n")
    code = cli.main(["preprocess", "--data", str(rel.root), "--config", str(cfg_file)])
    assert code == 1
    cache_dir = rel.root / "cache" / "volumes"  # the default location
    assert len(list(cache_dir.glob("*.npy"))) == 1 and len(list(cache_dir.glob("*.json"))) == 1
    skipped = [json.loads(line) for line in (cache_dir / SKIPPED_FILE).read_text().splitlines()]
    assert [s["reason"].split(": ", 1)[1][:12] for s in skipped] == ["1 NaN/Inf vo", "constant vol"]
    assert str(bad_nan) in skipped[0]["reason"]
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert "2 skipped" in capsys.readouterr().err
    # Fixing the files makes the next run clean and removes the stale skipped list.
    tiny.write_nifti(bad_nan, tiny.make_image(1))
    tiny.write_nifti(bad_const, tiny.make_image(2))
    assert cli.main(["preprocess", "--data", str(rel.root), "--config", str(cfg_file)]) == 0
    assert not (cache_dir / SKIPPED_FILE).exists()


def test_failed_write_leaves_no_partial_entry(release, tmp_path, monkeypatch):
    from reasonknee3d.data import cache as cache_mod
    img = next(iter(release.images.values()))

    def broken_write_json(path, obj, indent=1):
        raise OSError("disk full")
    monkeypatch.setattr(cache_mod, "write_json", broken_write_json)
    with pytest.raises(OSError, match="disk full"):
        VolumeCache(tmp_path / "c", CFG).put(img)
    assert list((tmp_path / "c").iterdir()) == []


def test_preprocess_command_dispatches_slice_configs_to_the_feature_cache(tmp_path):
    """`preprocess --config <slice yaml>` fills the vision-feature cache, not the volume cache."""

    from reasonknee3d.cli import main
    from reasonknee3d.data.synth import write_synthetic_release

    release = tmp_path / "rel"
    write_synthetic_release(release, n_volumes=3, shape=(16, 32, 32), seed=0, questions=[1])
    config = PRESETS / "tiny_slice.yaml"
    assert main(["preprocess", "--data", str(release), "--config", str(config), "--splits", "train"]) == 0
    assert list((release / "cache" / "slice_features").rglob("*.safetensors"))
    assert not (release / "cache" / "volumes").exists()


def test_preprocess_lists_unusable_csv_rows_and_caches_the_rest(release_factory, tmp_path):
    rel = release_factory(n_volumes=3)
    csv_file = rel.root / "data/split_files/test_split.csv"
    lines = csv_file.read_text().splitlines()
    lines[2] = lines[2].replace(",left,", ",sideways,")  # volume 1 is a left knee
    csv_file.write_text("\n".join(lines) + "\n")
    result = preprocess_release(rel.root, CFG, cache_dir=tmp_path / "c")
    assert result.n_done == 2 and len(result.skipped) == 1
    s = result.skipped[0]
    assert s.item == "test test_split.csv line 3" and "knee_side 'sideways'" in s.reason
