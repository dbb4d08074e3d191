"""The package works installed from a wheel, away from the repository: presets, resources and the demo ship inside.

Slow (a wheel build, a new virtual environment, ``demo --quick``: a minute or two). The new environment gets the
wheel without dependencies; its dependencies come from the running interpreter's site-packages through a
``.pth`` line (``.pth`` files in a folder added that way are not executed, so this interpreter's editable
install of the repository does not leak in). Everything runs from a folder outside the repository.
"""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_and_runs_the_quick_demo_outside_the_repository(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True, timeout=300)
    wheel = next(dist.glob("reasonknee3d-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Nothing of the runner's may be visible to pip: through PYTHONPATH or the dependency path below it would find
    # the runner's own (editable) reasonknee3d and skip the wheel as already installed.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   timeout=300, env=env)
    Path(site, "deps-from-test-runner.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env.update(REASONKNEE3D_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    where = subprocess.run([str(py), "-c", "import reasonknee3d; print(reasonknee3d.__file__)"], cwd=work, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(site), f"imported {where}, not the installed wheel in {site}"
    cli = venv / "bin" / "reasonknee3d"
    result = subprocess.run([str(cli), "demo", "--quick", "--out", str(work / "demo")], cwd=work, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (work / "demo" / "comparison.json").is_file()
    # init by preset name works from the wheel too.
    result = subprocess.run([str(cli), "init", "--config", "tiny_3d", "--out", str(work / "init")], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (work / "init" / "config.json").is_file()
