"""The same training entry under ``torchrun --nproc_per_node 2`` (gloo on CPU) keeps ranks in sync."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TOY = Path(__file__).with_name("toy_family.py")


@pytest.mark.slow  # two fresh interpreters importing torch + transformers: 20-50 s on 2 shared cores
def test_torchrun_two_processes_train_identical_parameters(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TOY), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "params_rank0.pt")
    rank1 = torch.load(tmp_path / "params_rank1.pt")
    assert rank0.keys() == rank1.keys() and any("lora_B" in k for k in rank0)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # Training happened: LoRA B starts at zero and must have moved, identically on both ranks.
    assert any(rank0[k].abs().sum() > 0 for k in rank0 if "lora_B" in k)
    # Only the main process wrote the run files, once.
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
