"""One process of ``test_cache_distributed.py``'s two-process run (started with RANK / WORLD_SIZE set).

argv: RELEASE OUT. Joins the group from the environment, runs the ``tiny_3d`` family's ``preprocess`` three
times (fresh cache, rerun, after rank 0 replaced one volume with a constant one) and writes what this rank
saw, including the volumes its ``VolumeCache.put`` was called for, to ``OUT/rank<N>.json``.
"""
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch.distributed as dist

from reasonknee3d.data import cache as cache_mod
from reasonknee3d.data.distributed import process_group_from_env
from reasonknee3d.data.release import ReleaseLoader
from reasonknee3d.families import get_family, load_experiment_config

release, out = Path(sys.argv[1]), Path(sys.argv[2])
calls: list[str] = []
_put = cache_mod.VolumeCache.put


def recording_put(self, image_path):
    calls.append(Path(image_path).name)
    return _put(self, image_path)


cache_mod.VolumeCache.put = recording_put
exp = load_experiment_config("tiny_3d")
family = get_family(exp.family)
seen = {}
with process_group_from_env() as (rank, world):
    for phase in ("fresh", "rerun", "one_bad"):
        if phase == "one_bad":
            dist.barrier()
            if rank == 0:
                first = ReleaseLoader(release).volume_rows("train")[0][0].image_path
                img = nib.load(str(first))
                nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine), str(first))
            dist.barrier()
        calls.clear()
        r = family.preprocess(exp, release, ["train", "val", "test"])
        seen[phase] = {"put": list(calls), "n_done": r.n_done, "skipped": [s.item for s in r.skipped],
                       "ranks": r.ranks, "rank": r.rank, "world_size": r.world_size, "written": r.written,
                       "skipped_path": None if r.skipped_path is None else str(r.skipped_path)}
(out / f"rank{rank}.json").write_text(json.dumps(seen))
