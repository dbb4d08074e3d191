"""Print what `reasonknee3d zeroshot --preset paper` builds for the first train sample of a release: the hf
video frames (count, size, the processor grid at its default size, fps), the openai slices and the guided prompt.

Usage: python scripts/show_paper_inputs.py RELEASE_DIR  (the Qwen2.5-VL processor settings of the tiny checkpoint)
"""
import sys, tempfile
from transformers import AutoProcessor
from reasonknee3d.data.io import load_volume
from reasonknee3d.data.release import iter_samples
from reasonknee3d.evaluation.zeroshot import (PAPER_SYSTEM_PROMPT, ZeroShotPrompts, paper_hf_inputs,
                                              paper_openai_frames, paper_video_frames)
from reasonknee3d.models.tiny_qwen import default_tiny_qwen_dir

rel = sys.argv[1]
s = next(iter(iter_samples(rel, "train")))
vol, _ = load_volume(s.image_path)
frames = paper_video_frames(vol)
print("volume", tuple(vol.shape), "-> hf frames", tuple(frames.shape), frames.dtype,
      "per-slice max/min (slice 80):", int(frames[80, 0].max()), int(frames[80, 0].min()))
proc = AutoProcessor.from_pretrained(default_tiny_qwen_dir(tempfile.mkdtemp()))  # Qwen2.5-VL processor settings
texts = ZeroShotPrompts(rel, "paper")
prompt = texts.prompt(s.question_id, "guided")
batch = paper_hf_inputs(proc, [frames], [prompt])
g = batch["video_grid_thw"][0].tolist()
print("processor grid (t, h, w) patches:", g, "-> frame px", g[1] * 14, "x", g[2] * 14,
      "| video tokens", g[0] * g[1] * g[2] // 4, "| second_per_grid_ts", batch["second_per_grid_ts"])
of, idx = paper_openai_frames(vol)
print("openai frames", tuple(of.shape), "slices", idx.tolist())
print("system:", PAPER_SYSTEM_PROMPT)
print(f"question {s.question_id} (guided):", prompt)
