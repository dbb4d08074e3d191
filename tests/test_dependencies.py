"""What is installed lies inside the ranges setup.cfg declares, so a release outside them cannot pass unnoticed.

The README install resolves the newest versions inside these ranges; a run of this suite on a fresh install
therefore tests exactly the releases users get. The round trip of a tiny checkpoint through the installed
transformers' Auto classes is in tests/models/test_tiny_qwen.py.
"""
from __future__ import annotations

import configparser
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement

SETUP_CFG = Path(__file__).parents[1] / "setup.cfg"


def declared(section: str, key: str) -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG, encoding="utf-8")
    lines = cfg.get(section, key).splitlines()
    return [Requirement(line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]


def out_of_range(requirements: list[Requirement], optional: bool = False) -> list[str]:
    """``name: installed X, declared SPEC`` for every requirement the installed version breaks."""
    bad = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            installed = version(req.name)
        except PackageNotFoundError:
            if not optional:
                bad.append(f"{req.name}: not installed, declared {req.specifier}")
            continue
        if not req.specifier.contains(installed, prereleases=True):
            bad.append(f"{req.name}: installed {installed}, declared {req.specifier}")
    return bad


def test_installed_runtime_dependencies_are_inside_the_declared_ranges() -> None:
    reqs = declared("options", "install_requires")
    assert {"torch", "transformers", "tokenizers", "peft", "safetensors"} <= {r.name for r in reqs}
    assert out_of_range(reqs) == []


def test_installed_dev_dependencies_are_inside_the_declared_ranges() -> None:
    assert out_of_range(declared("options.extras_require", "dev")) == []


def test_every_range_has_an_upper_bound() -> None:
    """An open range would let the next major release in untested."""
    reqs = declared("options", "install_requires") + declared("options.extras_require", "dev")
    assert [str(r) for r in reqs if not any(s.operator in ("<", "<=", "==", "~=") for s in r.specifier)] == []


def test_a_version_outside_a_range_is_reported() -> None:
    reqs = [Requirement("transformers>=5.0,<5.1"), Requirement("pytest>=8"), Requirement("not-a-real-dist-xyz>=1")]
    bad = out_of_range(reqs)
    assert bad[0].startswith(f"transformers: installed {version('transformers')}, declared ")
    assert bad[1:] == ["not-a-real-dist-xyz: not installed, declared >=1"]
    assert out_of_range(reqs[2:], optional=True) == []


def test_the_transformers_range_is_one_minor_release() -> None:
    """The tiny checkpoint and the 3D model's weight loading depend on how transformers saves; a new minor
    release is let in by widening this range after the suite has passed on it, not by the resolver."""
    (req,) = [r for r in declared("options", "install_requires") if r.name == "transformers"]
    lows = [s.version for s in req.specifier if s.operator == ">="]
    highs = [s.version for s in req.specifier if s.operator == "<"]
    assert len(lows) == len(highs) == 1
    major, minor = (int(p) for p in lows[0].split(".")[:2])
    assert highs[0] == f"{major}.{minor + 1}", str(req)
