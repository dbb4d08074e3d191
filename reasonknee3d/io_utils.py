"""Atomic file output: every file the package writes appears whole or not at all.

Writers go to a temporary file in the destination folder and ``os.replace`` it into place, so an
interrupted job never leaves a half-written result and a rerun replaces old outputs cleanly. Files and
folders get the permissions a plain ``open`` / ``mkdir`` would give them (0666 / 0777 less the umask), not
the private 0600 / 0700 of ``mkstemp`` / ``mkdtemp``.

Commands that write a whole folder (``init``, ``synth``, ``demo``) mark it with ``OUTPUT_MARKER`` and go
through ``check_output_dir`` first, so they never replace a folder they did not write.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Mapping, Optional

OUTPUT_MARKER = ".reasonknee3d-output.json"
"""Marker file naming the command (and its settings) that wrote a folder."""


def current_umask() -> int:
    """The process umask. Read from /proc where possible: ``os.umask`` can only be read by setting it,
    which briefly changes it for every thread."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error removed.

    The temporary name keeps the full suffix (``.nii.gz``, ``.npy``) so libraries that pick a format by
    extension write the right one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes),
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~current_umask())
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """``open`` that writes through ``atomic_path``."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def normalize_permissions(folder: str | os.PathLike) -> None:
    """Give every file and folder under ``folder`` the permissions of a plain ``open`` / ``mkdir``.

    Libraries that write through ``tempfile`` (transformers' weight shards, for one) leave private 0600
    files; a model folder should be as readable as the rest of the run. Execute bits are kept, symlinks are
    left alone.
    """
    mask = current_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                os.chmod(path, (0o666 | (st.st_mode & 0o111)) & ~mask)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; on success it replaces ``path``, on error it is removed.

    An existing ``path`` is renamed aside first and deleted only after the new folder is in place, so at
    every moment the old or the new folder is complete. Callers decide whether ``path`` may be replaced
    (``check_output_dir``); this refuses only the current folder and its parents.
    """
    path = Path(os.path.abspath(path))
    cwd = Path.cwd().resolve()
    if path.resolve() == cwd or path.resolve() in cwd.parents:
        raise ValueError(f"{path} is the current folder or contains it; write into a new sub-folder instead")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        normalize_permissions(tmp)
        old = None
        if path.exists() or path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            old = old / path.name
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class OutputDirError(FileExistsError):
    """An output folder holds something the command did not write, or ``--overwrite`` was not given."""


def read_output_marker(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The marker of a folder a reasonknee3d command wrote (None when absent or unreadable)."""
    try:
        marker = json.loads((Path(folder) / OUTPUT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("command"), str) else None


def output_marker(command: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Marker content: the command and its settings, as JSON values (tuples become lists)."""
    from .constants import VERSION as __version__
    return {"command": command, "settings": json.loads(json.dumps(dict(settings), default=str)),
            "reasonknee3d_version": __version__}


def write_output_marker(folder: str | os.PathLike, command: str, settings: Mapping[str, Any]) -> None:
    write_json(Path(folder) / OUTPUT_MARKER, output_marker(command, settings))


def check_output_dir(path: str | os.PathLike, command: str, overwrite: bool,
                     settings: Optional[Mapping[str, Any]] = None,
                     replaces_folder: bool = True) -> Optional[dict[str, Any]]:
    """Raise ``OutputDirError`` unless ``command`` may write the folder ``path``.

    Allowed: ``path`` does not exist or is an empty folder; or it holds the earlier output of the same
    ``command`` (its ``OUTPUT_MARKER``) and ``overwrite`` is set. Refused: the current folder or one that
    contains it, a file, a non-empty folder without our marker or with another command's marker, and our own
    output without ``overwrite``. Returns the earlier marker when there is one. ``settings`` only adds the
    difference to the message. ``replaces_folder`` False (a command that writes inside the folder and never
    renames it) allows the current folder under the same rules.
    """
    path = Path(path)
    flag = f"reasonknee3d {command}"
    if not (path.exists() or path.is_symlink()):
        return None
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    if replaces_folder and (resolved == cwd or resolved in cwd.parents):
        raise OutputDirError(f"{path} is the current folder (or contains it); {flag} replaces its output folder "
                             f"as a whole, so choose a new sub-folder")
    if not path.is_dir():
        raise OutputDirError(f"{path} exists and is not a folder; choose another output folder")
    if not any(path.iterdir()):
        return None
    marker = read_output_marker(path)
    if marker is None:
        raise OutputDirError(f"{path} is not empty and was not written by {flag} (no {OUTPUT_MARKER}); choose "
                             f"another folder (--overwrite replaces only a folder {flag} wrote)")
    if marker["command"] != command:
        raise OutputDirError(f"{path} holds the output of reasonknee3d {marker['command']}, not of {flag}; choose "
                             f"another folder")
    if not overwrite:
        earlier = marker.get("settings")
        differ = ""
        if settings is not None and earlier != output_marker(command, settings)["settings"]:
            differ = f" with other settings ({json.dumps(earlier)})"
        raise OutputDirError(f"{path} is not empty: it holds the output of an earlier {flag}{differ}; pass "
                             f"--overwrite to replace it, or choose another folder")
    return marker


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=indent, ensure_ascii=False)
        fh.write("\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Write rows as JSON lines atomically; returns the number of lines."""
    n = 0
    with atomic_open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
