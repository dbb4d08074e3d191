"""How long building the 3D-native model takes at the real preset's shapes, and where that time goes.

    python scripts/time_3d_build.py [--layers N] [--scale D] [--top K]

Builds once, into the user cache, the random-weight checkpoint of Qwen2.5-VL-3B's shapes that
`reasonknee3d bench --real-size` uses (the true 36 layers and widths unless `--layers` / `--scale` shrink them),
then builds the `rk3d_qwen2.5vl_3b` preset on it under cProfile, as `train` and `init` do before anything else:
encoder and projector built fresh, the language model copied from the checkpoint. Prints the build's seconds,
the parameters per dtype, and the K functions with the most time of their own.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections import Counter
from typing import Sequence

from reasonknee3d.bench.real_size import RealSizeSettings, real_size_checkpoint, real_size_model_overrides
from reasonknee3d.families import get_family, load_experiment_config

PRESET = "rk3d_qwen2.5vl_3b"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="layers of the language model and the 3D encoder "
                    "(default: the real 36 and 12)")
    ap.add_argument("--scale", type=int, default=1, help="divide the widths by this (1, 2 or 4; default 1)")
    ap.add_argument("--top", type=int, default=8, help="functions listed by their own time (default 8)")
    a = ap.parse_args(argv)

    settings = RealSizeSettings(layers=a.layers, width_divisor=a.scale)
    lm_dir, info = real_size_checkpoint(settings)
    print(f"checkpoint: {lm_dir} (" + ("reused" if info["reused"] else f"built in {info['build_s']:.1f} s") + ")")
    overrides = real_size_model_overrides(settings, load_experiment_config(PRESET), lm_dir)
    exp = load_experiment_config(PRESET, overrides)

    profile = cProfile.Profile()
    t0 = time.perf_counter()
    profile.enable()
    model, _ = get_family(exp.family).build(exp, "sdpa")
    profile.disable()
    seconds = time.perf_counter() - t0
    counts = Counter()
    for p in model.parameters():
        counts[str(p.dtype).removeprefix("torch.")] += p.numel()
    print(f"build: {seconds:.1f} s; parameters: " + ", ".join(f"{n:,} {d}" for d, n in sorted(counts.items())))
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(a.top)
    print(text.getvalue().split("\n\n", 1)[-1].rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
