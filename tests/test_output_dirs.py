"""Output folders: permissions of written files, atomic folder swaps, and init / synth / demo never deleting
what they did not write."""
from __future__ import annotations

from reasonknee3d.families import resolve_config

import json
import os
import stat
from pathlib import Path

import pytest

from reasonknee3d.cli import main
from reasonknee3d.io_utils import (OUTPUT_MARKER, OutputDirError, atomic_dir, check_output_dir, read_output_marker,
                                   write_json, write_output_marker)

TINY = resolve_config("tiny_3d")


@pytest.fixture
def umask():
    """Run with umask 027 (group may read, others nothing), restored afterwards."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_and_folders_follow_the_umask(tmp_path: Path, umask: int) -> None:
    write_json(tmp_path / "a.json", {"x": 1})
    assert _mode(tmp_path / "a.json") == 0o666 & ~umask == 0o640
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "w.txt").write_text("w")
    assert _mode(tmp_path / "model") == 0o777 & ~umask == 0o750
    os.umask(0o002)
    write_json(tmp_path / "a.json", {"x": 2})  # a rewrite takes the umask of now
    assert _mode(tmp_path / "a.json") == 0o664


def test_init_model_folder_follows_the_umask(tmp_path: Path, umask: int) -> None:
    assert main(["init", "--config", str(TINY), "--out", str(tmp_path / "m")]) == 0
    modes = {p.name: _mode(p) for p in [tmp_path / "m", *(tmp_path / "m").iterdir()]}
    assert "model.safetensors" in modes and OUTPUT_MARKER in modes
    assert {k: v for k, v in modes.items() if v != (0o750 if k == "m" else 0o640)} == {}


def test_atomic_dir_swaps_whole_folders_and_refuses_the_current_one(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "m") as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["m"] and (tmp_path / "m" / "old.txt").is_file()
    with atomic_dir(tmp_path / "m") as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert [p.name for p in (tmp_path / "m").iterdir()] == ["new.txt"]
    monkeypatch.chdir(tmp_path / "m")
    for here in (".", tmp_path):
        with pytest.raises(ValueError, match="is the current folder or contains it"):
            with atomic_dir(here):
                pass
    assert (tmp_path / "m" / "new.txt").is_file()


def test_check_output_dir_cases(tmp_path: Path) -> None:
    assert check_output_dir(tmp_path / "new", "init", overwrite=False) is None
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", "init", overwrite=False) is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "file", "init", overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    write_output_marker(mine, "synth", {"seed": 1})
    with pytest.raises(OutputDirError, match=r"holds the output of reasonknee3d synth, not of reasonknee3d init"):
        check_output_dir(mine, "init", overwrite=True)
    with pytest.raises(OutputDirError, match=r"earlier reasonknee3d synth with other settings \(\{\"seed\": 1\}\); "
                                             r"pass --overwrite to replace it, or choose another folder"):
        check_output_dir(mine, "synth", overwrite=False, settings={"seed": 2})
    assert check_output_dir(mine, "synth", overwrite=True)["settings"] == {"seed": 1}
    assert read_output_marker(tmp_path / "empty") is None


def test_init_never_deletes_a_user_folder(tmp_path: Path, capsys, monkeypatch) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert main(["init", "--config", str(TINY), "--out", str(user), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"{user} is not empty and was not written by reasonknee3d init" in err and "choose another folder" in err
    assert (user / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["user"]
    # --out . in a folder with files: refused, nothing touched.
    monkeypatch.chdir(user)
    assert main(["init", "--config", str(TINY), "--out", "."]) == 2
    assert "is the current folder (or contains it)" in capsys.readouterr().err
    assert [p.name for p in user.iterdir()] == ["notes.txt"]


def test_init_replaces_its_own_output_only_with_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "rk3d"
    assert main(["init", "--config", str(TINY), "--out", str(out)]) == 0
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert marker["command"] == "init" and marker["settings"]["family"] == "3d"
    (out / "stale.txt").write_text("from the earlier run")
    assert main(["init", "--config", str(TINY), "--out", str(out)]) == 2
    assert "pass --overwrite to replace it, or choose another folder" in capsys.readouterr().err
    assert (out / "stale.txt").is_file()
    assert main(["init", "--config", str(TINY), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rk3d"]  # no temporary or old sibling left


def test_synth_refuses_user_folders_and_leaves_nothing_when_it_fails(tmp_path: Path, capsys, monkeypatch) -> None:
    import reasonknee3d.data.synth as synth
    user = tmp_path / "user"
    user.mkdir()
    (user / "scan.nii.gz").write_bytes(b"precious")
    assert main(["synth", str(user), "--volumes", "1", "--shape", "16", "32", "32", "--overwrite"]) == 2
    assert "was not written by reasonknee3d synth" in capsys.readouterr().err
    assert (user / "scan.nii.gz").read_bytes() == b"precious"

    # A failure halfway (here: the disk fills while the question files are written) leaves nothing behind.
    out = tmp_path / "release"
    real = synth._write_question_files

    def full_disk(root, qids):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(synth, "_write_question_files", full_disk)
    assert main(["synth", str(out), "--volumes", "2", "--shape", "16", "32", "32"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["user"]
    monkeypatch.setattr(synth, "_write_question_files", real)
    assert main(["synth", str(out), "--volumes", "2", "--shape", "16", "32", "32"]) == 0
    assert read_output_marker(out)["settings"]["volumes"] == 2
    assert main(["synth", str(out), "--volumes", "1", "--shape", "16", "32", "32"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["synth", str(out), "--volumes", "1", "--shape", "16", "32", "32", "--overwrite"]) == 0
    assert read_output_marker(out)["settings"]["volumes"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["release", "user"]


def test_demo_folder_rules(tmp_path: Path, capsys, monkeypatch) -> None:
    from dataclasses import asdict

    from reasonknee3d.demo import QUICK, DemoSettings, prepare_demo_dir
    full = {"quick": False, **asdict(DemoSettings())}
    quick = {"quick": True, **asdict(QUICK)}
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(user), "--quick", "--overwrite"]) == 2
    assert "was not written by reasonknee3d demo" in capsys.readouterr().err and (user / "keep.txt").is_file()
    monkeypatch.chdir(user)
    assert main(["demo", "--out", ".", "--quick"]) == 2
    assert "was not written by reasonknee3d demo" in capsys.readouterr().err
    assert [p.name for p in user.iterdir()] == ["keep.txt"]

    out = tmp_path / "demo"
    assert prepare_demo_dir(out, quick, overwrite=False) == "new"
    (out / "runs" / "3d" / "final").mkdir(parents=True)
    (out / "mine.txt").write_text("not the demo's")
    assert prepare_demo_dir(out, quick, overwrite=False) == "resume"  # same settings: reuse what is there
    assert (out / "runs" / "3d" / "final").is_dir()
    # The full demo never reuses models of a --quick run: refused without --overwrite ...
    assert main(["demo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "earlier reasonknee3d demo with other settings" in err and '"quick": true' in err
    assert "pass --overwrite to replace it" in err and (out / "runs" / "3d" / "final").is_dir()
    # ... and with it, the demo's own entries go, anything else stays.
    assert prepare_demo_dir(out, full, overwrite=True) == "overwrite"
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "mine.txt"]
    assert read_output_marker(out)["settings"]["quick"] is False
