"""Preprocessed-volume cache: each release volume is preprocessed once and training reads only the cache.

An entry is ``<volume_id>-<key>.npy`` (float16 ``(S, H, W)`` at ``cfg.input_shape``) plus ``.json``
metadata (source, loaded shape, spacing, settings, and with ``data.recentre`` the whole-voxel ``offset`` the
volume was moved by; ``VolumeCache.frame`` turns it into the volume's ``VolumeFrame``). The key hashes the
settings that change the array (``PreprocessConfig.array_settings``), the resolved source path and the source's
size and mtime, so changing either preprocessing or the file gives a new entry instead of a stale one. Both files
are written atomically and the ``.json`` last, so an entry exists exactly when its ``.json`` does. Arrays are
opened with ``np.load(mmap_mode="r")``: samples of one volume share one file and the OS page cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import numpy as np

from ..io_utils import atomic_open, write_json
from .io import VolumeError
from .release import BatchResult, ReleaseError, ReleaseLoader, Skipped, cache_root, volume_id_of, write_skipped
from .frame import VolumeFrame
from .transforms import PreprocessConfig, preprocess_volume, preprocess_volume_frame

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Bump when the preprocessing code changes the arrays it writes for the same settings.
CACHE_VERSION = 1
SKIPPED_FILE = "preprocess_skipped.jsonl"


class CacheMiss(FileNotFoundError):
    """The cache has no entry for a volume under the current settings."""


class VolumeCache:
    """Preprocessed arrays of one ``PreprocessConfig`` under ``cache_dir``."""

    def __init__(self, cache_dir: str | Path, cfg: PreprocessConfig) -> None:
        self.dir = Path(cache_dir)
        self.cfg = cfg
        self._meta: dict[Path, dict[str, Any]] = {}

    def key(self, image_path: str | Path) -> str:
        """Hash of the array settings and the source file's identity (resolved path, size, mtime)."""
        src = Path(image_path).resolve()
        try:
            st = src.stat()
        except OSError as e:
            raise CacheMiss(f"{src}: source volume not found ({e.strerror}); the cache key needs its size and "
                            f"mtime") from None
        ident = {"version": CACHE_VERSION, "settings": self.cfg.array_settings(), "source": str(src),
                 "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]

    def paths(self, image_path: str | Path) -> tuple[Path, Path]:
        """(array, metadata) file paths of a volume's entry."""
        stem = f"{volume_id_of(image_path)}-{self.key(image_path)}"
        return self.dir / f"{stem}.npy", self.dir / f"{stem}.json"

    def has(self, image_path: str | Path) -> bool:
        return self.paths(image_path)[1].is_file()

    def put(self, image_path: str | Path) -> Path:
        """Preprocess one volume and write its entry (array first, metadata last); returns the array path."""
        arr_path, meta_path = self.paths(image_path)
        arr, frame = preprocess_volume_frame(image_path, self.cfg)
        with atomic_open(arr_path, "wb") as fh:
            np.save(fh, arr.astype(np.float16))
        meta = {"source": str(Path(image_path).resolve()), "orig_shape": list(frame.stored_shape),
                "input_shape": list(arr.shape), "settings": self.cfg.array_settings(), "version": CACHE_VERSION}
        if self.cfg.recentre is not None:
            meta["offset"] = list(frame.offset)  # model voxels the volume was moved by (VolumeFrame.offset)
        try:
            write_json(meta_path, meta)
        except BaseException:
            arr_path.unlink(missing_ok=True)  # an array without metadata is not an entry
            raise
        return arr_path

    def load(self, image_path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
        """Memory-mapped float16 ``(S, H, W)`` array and metadata; ``CacheMiss`` if not preprocessed."""
        arr_path, meta_path = self.paths(image_path)
        meta = self._meta.get(meta_path)
        if meta is None:
            if not meta_path.is_file():
                raise CacheMiss(f"{image_path}: not in the cache {self.dir} for settings "
                                f"{self.cfg.array_settings()}; run `reasonknee3d preprocess` first")
            meta = self._meta[meta_path] = json.loads(meta_path.read_text(encoding="utf-8"))
        return np.load(arr_path, mmap_mode="r"), meta

    def frame(self, image_path: str | Path, meta: dict[str, Any], knee_side: Optional[str] = None) -> VolumeFrame:
        """The ``VolumeFrame`` of a cached volume from its metadata (``load`` / ``read_tensor``): stored and model
        shapes, whether it is mirrored (knee side ``knee_side``, else from the file name) and its offset."""
        return VolumeFrame.from_meta(meta, self.cfg.mirrors(image_path, knee_side))

    def read_tensor(self, image_path: str | Path) -> tuple["torch.Tensor", dict[str, Any]]:
        """One volume as an in-memory ``(1, S, H, W)`` float16 tensor (the cache's dtype) and its metadata.

        The array stays float16 on the way to the model: the patch embedding casts it to the model's dtype on
        the device, so the loader neither writes a float32 copy nor ships twice the bytes to the GPU.
        """
        import torch

        arr, meta = self.load(image_path)
        return torch.from_numpy(np.array(arr))[None], meta


@dataclass
class CacheFillResult(BatchResult):
    """``BatchResult`` of ``fill_volume_cache``; ``n_done`` and ``skipped`` cover every process of the run.

    ``rank`` / ``world_size``: this process's place; ``ranks``: per process, in rank order, the volumes it was
    given (``assigned``), wrote (``written``), found already cached (``present``) and skipped (``skipped``).
    """
    rank: int = 0
    world_size: int = 1
    ranks: list[dict[str, int]] = field(default_factory=list)

    @property
    def written(self) -> int:
        """Entries this process wrote."""
        return self.ranks[self.rank]["written"] if self.ranks else 0


def _gather(payload: Any, world: int) -> list[Any]:
    """Every rank's ``payload``, in rank order (the calling process's group; itself alone when world is 1)."""
    if world == 1:
        return [payload]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, payload)
    return out


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist
        dist.barrier()


def fill_volume_cache(root: str | Path, cache_dir: Path, splits: Iterable[str], has: Callable[[Path], bool],
                      put: Callable[[Path], Any], images: str | Path | None = None,
                      distributed: bool = False) -> CacheFillResult:
    """Call ``put(image_path)`` for every volume of ``splits`` (each once) for which ``has`` is false.

    Shared by the volume cache and the slice baseline's feature cache: bad volumes are skipped and listed
    in ``<cache_dir>/preprocess_skipped.jsonl``; ``n_done`` counts entries written or already present.

    ``distributed``: split the volumes over the processes of a torchrun / accelerate launch (an initialized
    ``torch.distributed`` group, else one joined from ``RANK`` / ``WORLD_SIZE`` for this call,
    ``distributed.process_group_from_env``). The volumes, in release order without repeats, are the same list
    on every rank; volume i goes to rank i % world size, so the parts are disjoint and balanced whatever is
    already cached, and a volume is never written by two processes (each entry is written atomically anyway).
    When all are done, every rank's counts and skipped items are gathered (one ``all_gather_object``): rank 0
    writes the one skipped list, in release order as a single process would, the others wait for it at a
    barrier, and every rank returns the same totals. A rank that fails with an unexpected error still joins the
    gather, so the others raise an error naming it instead of waiting forever. Every rank must call this
    together; the training path (one process fills the cache while the others wait) leaves it False.
    """
    from contextlib import nullcontext

    from .distributed import process_group_from_env, shard

    loader = ReleaseLoader(root, images=images)
    seen: set[Path] = set()
    problems: list[Skipped] = []
    volumes: list[tuple[int, str, Any]] = []  # (release order, split, record), each image once
    for split in splits:
        records, row_problems = loader.volume_rows(split)  # unusable CSV rows are listed, not fatal
        problems += [Skipped(f"{split} {p.csv.name} line {p.line}", p.reason, p.kind) for p in row_problems]
        for vol in records:
            if vol.image_path not in seen:
                seen.add(vol.image_path)
                volumes.append((len(volumes), split, vol))
    group = process_group_from_env() if distributed else nullcontext((0, 1))
    with group as (rank, world):
        mine = shard(volumes, rank, world)
        failed: list[tuple[int, Skipped]] = []
        counts = {"rank": rank, "assigned": len(mine), "written": 0, "present": 0, "skipped": 0}
        error: Exception | None = None
        try:
            for index, split, vol in mine:
                try:
                    if has(vol.image_path):
                        counts["present"] += 1
                    else:
                        put(vol.image_path)
                        counts["written"] += 1
                except (VolumeError, ReleaseError, CacheMiss) as e:
                    failed.append((index, Skipped(f"{split} {vol.volume_id}", str(e))))
                    counts["skipped"] += 1
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have heard of it
            if world == 1:
                raise
            error = e
        logger.info("%s: rank %d of %d: %d volumes, %d written, %d already cached, %d skipped", cache_dir, rank,
                    world, counts["assigned"], counts["written"], counts["present"], counts["skipped"])
        gathered = _gather((counts, failed, None if error is None else f"{type(error).__name__}: {error}"), world)
        if error is not None:
            raise error
        errors = [f"rank {r}: {msg}" for r, (_, _, msg) in enumerate(gathered) if msg is not None]
        if errors:
            raise RuntimeError(f"filling {cache_dir}: another process failed ({'; '.join(errors)})")
        skipped = problems + [s for _, s in sorted((f for _, part, _ in gathered for f in part), key=lambda f: f[0])]
        per_rank = [c for c, _, _ in gathered]
        n_done = sum(c["written"] + c["present"] for c in per_rank)
        skipped_path = cache_dir / SKIPPED_FILE
        if rank == 0:
            cache_dir.mkdir(parents=True, exist_ok=True)
            write_skipped(skipped_path, skipped)
        _barrier(world)  # the list is complete before any rank reports it
    return CacheFillResult(out=cache_dir, n_done=n_done, skipped=skipped,
                           skipped_path=skipped_path if skipped else None, rank=rank, world_size=world,
                           ranks=per_rank)


def preprocess_release(root: str | Path, cfg: PreprocessConfig, splits: Iterable[str] = ("train", "val", "test"),
                       cache_dir: str | Path | None = None, images: str | Path | None = None,
                       distributed: bool = False) -> CacheFillResult:
    """Fill the volume cache for every volume of ``splits`` (see ``fill_volume_cache``). ``cache_dir``: the
    volume cache folder itself; unset: ``volumes/`` under ``cfg.cache_dir`` or ``<root>/cache``. ``images``
    (default ``cfg.images``): where volumes are found by name when the written paths do not exist.
    ``distributed``: split the volumes over the processes of a torchrun / accelerate launch."""
    cache = VolumeCache(cache_dir if cache_dir is not None else cache_root(root, cfg.cache_dir) / "volumes", cfg)
    return fill_volume_cache(root, cache.dir, splits, cache.has, cache.put,
                             images=images if images is not None else cfg.images, distributed=distributed)


def bench_cache(work_dir: str | Path, shape: tuple[int, int, int] = (160, 384, 384),
                cfg: PreprocessConfig | None = None, repeats: int = 5) -> dict[str, Any]:
    """Median seconds to get one model-input volume from the NIfTI (load + preprocess) and from the cache.

    Writes one random int16 volume of ``shape`` (release spacing) under ``work_dir`` and times both paths
    ``repeats`` times in this process; returns the medians and their ratio.
    """
    import time

    import nibabel as nib

    cfg = cfg or PreprocessConfig()
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    path = work / "bench_00m_1_1_right.nii.gz"
    spacing = np.array([112.0, 140.0, 140.0]) / np.asarray(shape)  # the release's physical field of view
    nib.save(nib.Nifti1Image(rng.integers(0, 1000, shape, dtype=np.int16), np.diag([*spacing, 1.0])), str(path))
    cache = VolumeCache(work / "cache", cfg)
    cache.put(path)

    def median_time(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    nifti_s = median_time(lambda: preprocess_volume(path, cfg))
    cache_s = median_time(lambda: cache.read_tensor(path))  # what the Dataset does
    return {"shape": list(shape), "input_shape": list(cfg.input_shape), "repeats": repeats,
            "nifti_load_preprocess_s": nifti_s, "cache_load_s": cache_s, "ratio": nifti_s / cache_s}
