"""Shared setup for the trainer tests: one torch thread, and the toy family importable as ``toy_family``."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

# The test machine has 2 cores shared by several jobs: with 2 intra-op threads, tiny matmuls spend most
# of their time in thread hand-off (10 ms per linear instead of microseconds).
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
