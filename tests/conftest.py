"""Settings shared by every test: tiny checkpoints are cached in a per-session folder, not the user's cache."""
from __future__ import annotations

import os

import pytest

from reasonknee3d.models.tiny_qwen import CACHE_ENV


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Point ``REASONKNEE3D_CACHE`` at a fresh folder for the session (child processes inherit it)."""
    before = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("reasonknee3d-cache"))
    yield
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before
