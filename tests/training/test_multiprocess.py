"""The same training entry under ``torchrun --nproc_per_node 2`` (gloo on CPU) keeps ranks in sync and starts
from a fresh state."""
from __future__ import annotations

import json
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


def test_torchrun_trains_the_tiny_3d_config_from_a_fresh_cache(tmp_path: Path) -> None:
    """Two ranks, the real CLI entry, nothing cached: both ranks need the tiny LM that the tiny_3d preset builds.

    transformers writes model files on rank 0 only, so a rank that builds its own copy gets a folder without
    config.json; the run must instead read rank 0's single build from the (fresh) cache folder.
    """
    from reasonknee3d.data.synth import write_synthetic_release
    from reasonknee3d.models.tiny_qwen import CACHE_ENV, TINY_BUILD_MARKER

    release, run, cache = tmp_path / "release", tmp_path / "run", tmp_path / "cache"
    # The smallest release the generator makes, 2 questions per volume; the config resizes volumes to its input.
    write_synthetic_release(release, n_volumes=3, shape=(16, 32, 32), seed=0, questions=[1, 30])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", CACHE_ENV: str(cache)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "reasonknee3d", "train", "--config", "tiny_3d", "--data", str(release),
           "--output-dir", str(run), "--max-steps", "2", "--save-steps", "1000", "train.per_device_batch_size=1",
           "train.logging_steps=1", "train.dataloader_num_workers=0", "train.report_to=[]"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("trained to step 2") == 2  # both ranks got through, not only rank 0
    final = run / "final"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "experiment.yaml"):
        assert (final / name).is_file(), name
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (run / ".final.tmp").exists()
    # One complete tiny checkpoint in the cache, no staging folder left behind, nothing in the working folder.
    built = sorted((cache / "checkpoints").iterdir())
    assert len(built) == 1 and (built[0] / TINY_BUILD_MARKER).is_file() and (built[0] / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "release", "run"]
