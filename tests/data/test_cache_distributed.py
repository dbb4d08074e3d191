"""``preprocess`` split over the processes of a torchrun / accelerate launch (``fill_volume_cache(distributed=True)``)."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reasonknee3d.data import cache as cache_mod
from reasonknee3d.data import distributed
from reasonknee3d.data.cache import SKIPPED_FILE, fill_volume_cache, preprocess_release
from reasonknee3d.data.distributed import env_rank, shard
from reasonknee3d.data.release import ReleaseLoader, Skipped
from reasonknee3d.data.transforms import PreprocessConfig

RANK_SCRIPT = Path(__file__).with_name("preprocess_rank.py")
CFG = PreprocessConfig(input_shape=(4, 6, 5))


@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (4, 2), (7, 3), (5, 8)])
def test_shard_parts_are_disjoint_cover_everything_and_balanced(n, world):
    items = [f"v{i}" for i in range(n)]
    parts = [shard(items, r, world) for r in range(world)]
    assert sorted(x for p in parts for x in p) == sorted(items)
    assert len({x for p in parts for x in p}) == n
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[0][:2] == items[0:2 * world:world][:2]  # item i -> rank i % world


def test_shard_and_env_reject_bad_ranks(monkeypatch):
    with pytest.raises(ValueError, match="rank 2 of world size 2"):
        shard([1, 2], 2, 2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two': expected a whole number"):
        env_rank()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        env_rank()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert env_rank() == (1, 2, 1)


def test_one_process_reports_its_counts(release_factory, tmp_path):
    rel = release_factory(n_volumes=3)
    first = preprocess_release(rel.root, CFG, cache_dir=tmp_path / "c", distributed=True)
    assert (first.rank, first.world_size, first.n_done, first.written) == (0, 1, 3, 3)
    assert first.ranks == [{"rank": 0, "assigned": 3, "written": 3, "present": 0, "skipped": 0}]
    again = preprocess_release(rel.root, CFG, cache_dir=tmp_path / "c", distributed=True)
    assert again.written == 0 and again.ranks[0]["present"] == 3 and again.n_done == 3


def _as_rank(monkeypatch, rank: int, world: int, others: dict[int, tuple]) -> list:
    """Make ``fill_volume_cache`` run as ``rank`` of ``world`` with the other ranks' gathered payloads given."""
    sent = []

    @contextlib.contextmanager
    def group():
        yield rank, world

    def gather(payload, n):
        sent.append(payload)
        return [payload if r == rank else others[r] for r in range(n)]
    monkeypatch.setattr(distributed, "process_group_from_env", group)
    monkeypatch.setattr(cache_mod, "_gather", gather)
    monkeypatch.setattr(cache_mod, "_barrier", lambda n: None)
    return sent


def test_rank0_takes_every_other_volume_and_merges_skipped_lists_in_release_order(release_factory, tmp_path,
                                                                                   monkeypatch):
    rel = release_factory(n_volumes=3)
    order = [v.image_path for split in ("train", "val", "test") for v in ReleaseLoader(rel.root).volume_rows(split)[0]]
    order = list(dict.fromkeys(order))
    rank1 = ({"rank": 1, "assigned": 1, "written": 0, "present": 0, "skipped": 1},
             [(1, Skipped("val vol1", "unreadable"))], None)
    sent = _as_rank(monkeypatch, 0, 2, {1: rank1})
    put = []
    cache_dir = tmp_path / "c"
    result = fill_volume_cache(rel.root, cache_dir, ["train", "val", "test"], lambda p: False, put.append,
                               distributed=True)
    assert put == [order[0], order[2]]  # volumes 0 and 2 of 3; volume 1 is rank 1's
    assert sent[0][0] == {"rank": 0, "assigned": 2, "written": 2, "present": 0, "skipped": 0}
    assert result.n_done == 2 and result.written == 2 and [s.item for s in result.skipped] == ["val vol1"]
    assert [json.loads(line)["item"] for line in (cache_dir / SKIPPED_FILE).read_text().splitlines()] == ["val vol1"]


def test_rank1_leaves_the_skipped_list_to_rank0(release_factory, tmp_path, monkeypatch):
    rel = release_factory(n_volumes=3)
    rank0 = ({"rank": 0, "assigned": 2, "written": 1, "present": 0, "skipped": 1},
             [(2, Skipped("test vol2", "bad")), (0, Skipped("train vol0", "bad"))], None)
    _as_rank(monkeypatch, 1, 2, {0: rank0})
    put = []
    result = fill_volume_cache(rel.root, tmp_path / "c", ["train", "val", "test"], lambda p: False, put.append,
                               distributed=True)
    assert len(put) == 1 and result.n_done == 2
    assert [s.item for s in result.skipped] == ["train vol0", "test vol2"]  # release order, not arrival order
    assert result.skipped_path == tmp_path / "c" / SKIPPED_FILE and not result.skipped_path.exists()


def test_a_failing_rank_is_named_by_the_others_instead_of_hanging(release_factory, tmp_path, monkeypatch):
    rel = release_factory(n_volumes=3)
    rank1 = ({"rank": 1, "assigned": 1, "written": 0, "present": 0, "skipped": 0}, [], "MemoryError: out of memory")
    _as_rank(monkeypatch, 0, 2, {1: rank1})
    with pytest.raises(RuntimeError, match="another process failed .rank 1: MemoryError: out of memory"):
        fill_volume_cache(rel.root, tmp_path / "c", ["train"], lambda p: False, lambda p: None, distributed=True)

    def boom(path):
        raise KeyError("a bug")
    sent = _as_rank(monkeypatch, 1, 2, {0: ({"rank": 0}, [], None)})
    with pytest.raises(KeyError, match="a bug"):  # its own error, after telling the others
        fill_volume_cache(rel.root, tmp_path / "c", ["train", "val", "test"], lambda p: False, boom, distributed=True)
    assert sent[0][2] == "KeyError: 'a bug'"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_split_the_volumes_and_a_rerun_does_nothing(tmp_path):
    from reasonknee3d.data.synth import write_synthetic_release

    release, out = tmp_path / "release", tmp_path / "out"
    out.mkdir()
    write_synthetic_release(release, n_volumes=4, shape=(16, 32, 32), seed=0, questions=[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(release), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    volumes = sorted({v.image_path.name for s in ("train", "val", "test") for v in ReleaseLoader(release).volume_rows(s)[0]})
    assert len(volumes) == 4

    fresh = [r["fresh"] for r in ranks]
    assert sorted(fresh[0]["put"] + fresh[1]["put"]) == volumes  # every volume once, by one process
    assert [len(f["put"]) for f in fresh] == [2, 2] and [f["written"] for f in fresh] == [2, 2]
    assert fresh[0]["ranks"] == fresh[1]["ranks"] and [f["rank"] for f in fresh] == [0, 1]
    assert all(f["n_done"] == 4 and f["world_size"] == 2 and f["skipped"] == [] for f in fresh)
    cache_dir = release / "cache" / "volumes"
    assert len(list(cache_dir.glob("*.npy"))) == 4 and len(list(cache_dir.glob("*.json"))) == 4
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".")]

    rerun = [r["rerun"] for r in ranks]
    assert [r["put"] for r in rerun] == [[], []] and [r["ranks"][r["rank"]]["present"] for r in rerun] == [2, 2]
    assert all(r["n_done"] == 4 for r in rerun)

    # One volume replaced by a constant one: its owner skips it, rank 0 writes the one merged list.
    bad = [r["one_bad"] for r in ranks]
    assert sum(len(b["put"]) for b in bad) == 1 and all(b["n_done"] == 3 for b in bad)
    assert bad[0]["skipped"] == bad[1]["skipped"] and len(bad[0]["skipped"]) == 1
    lines = (cache_dir / SKIPPED_FILE).read_text().splitlines()
    assert [json.loads(line)["item"] for line in lines] == bad[0]["skipped"]
    assert "constant" in json.loads(lines[0])["reason"]


@pytest.mark.slow  # four torchrun launches of two fresh interpreters each: about a minute on 2 shared cores
@pytest.mark.parametrize("config,folder,suffix", [("tiny_3d", "volumes", ".npy"),
                                                  ("tiny_slice", "slice_features", ".safetensors")])
def test_preprocess_cli_under_torchrun(tmp_path, config, folder, suffix):
    from reasonknee3d.data.synth import write_synthetic_release

    release = tmp_path / "release"
    write_synthetic_release(release, n_volumes=4, shape=(16, 32, 32), seed=0, questions=[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "REASONKNEE3D_CACHE": str(tmp_path / "user_cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "reasonknee3d", "preprocess", "--data", str(release), "--config", config]
    cache_dir = release / "cache" / folder
    mtimes = None
    for _ in range(2):
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count(f"4 done -> {cache_dir}") == 2  # both ranks report the merged total
        entries = {p: p.stat().st_mtime_ns for p in cache_dir.iterdir()}
        assert len([p for p in entries if p.suffix == suffix]) == 4
        assert not [p for p in entries if p.name.startswith(".")] and not (cache_dir / SKIPPED_FILE).exists()
        assert mtimes is None or entries == mtimes  # the rerun wrote nothing
        mtimes = entries


def test_end_process_group_destroys_the_group_a_run_left(monkeypatch):
    import torch.distributed as dist

    distributed.end_process_group()  # no group: nothing to do
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    assert dist.is_initialized()
    distributed.end_process_group()
    assert not dist.is_initialized()
