"""`reasonknee3d` command line: parses arguments and calls library functions (no logic here).

Each subcommand is one ``_add_<name>`` function registering its parser and a handler; handlers import
their library module lazily, so light commands (``score``, ``export-references``) never import torch.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

Handler = Callable[[argparse.Namespace], int]


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a synthetic release in the real 3DReasonKnee layout")
    p.add_argument("out", type=Path)
    p.add_argument("--volumes", type=int, default=16)
    p.add_argument("--shape", type=int, nargs=3, default=(160, 384, 384), metavar=("S", "H", "W"))
    p.add_argument("--seed", type=int, default=0)

    def run(a: argparse.Namespace) -> int:
        from .data.synth import write_synthetic_release
        summary = write_synthetic_release(a.out, n_volumes=a.volumes, shape=tuple(a.shape), seed=a.seed)
        print(summary)
        return 0
    p.set_defaults(func=run)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_synth,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reasonknee3d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
