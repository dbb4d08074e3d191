"""Zero-shot runners of the paper: a local Qwen2-VL / Qwen2.5-VL checkpoint, or any OpenAI-compatible API.

Settings: ``plain`` (the question and the JSON shape of the answer), ``guided`` (adds grade
definitions, step-by-step reasoning and the Location / Final diagnosis answer format) and ``gt-crop``
(guided, on the volume cropped to the reference box + margin). Question texts come from the release's
``data/question_files`` when it has them, else from ``reasonknee3d.prompts``.

- ``hf``: slices as a video through the checkpoint's own processor (``models/slice``), batched
  greedy generation.
- ``openai``: evenly spaced slices as base64 PNG images in one chat-completions request per sample, with
  the JSON response format where the server accepts it, a request timeout, retries with backoff on 429 /
  5xx / network errors (honouring ``Retry-After``) and a thread pool that bounds concurrent requests. The
  API key is read from ``OPENAI_API_KEY``, sent to the base URL's host only (redirects are refused) and
  redacted from every error and log line. Only the standard library talks HTTP.

Two presets (``--preset``) decide the inputs:

- ``package`` (the default): the package's frame settings (``default_frames_config``: every slice at
  224 x 224 through the processor with fixed pixel limits for ``hf``; 32 slices evenly spread over the whole
  volume at 392 x 392 for ``openai``), intensities clipped to 0-400 over one fixed window, the project's
  question text with the grade list, the volume's grid and the Location / Final diagnosis answer format.
- ``paper``: the inputs of the paper's published zero-shot scripts. ``hf``: every sagittal slice as one
  video at 4 fps, each slice clipped to 0-400 and min-max scaled on its own, frames left at their stored
  size for the checkpoint processor's own resizing (a 384 x 384 slice becomes 392 x 392 in Qwen2.5-VL, with
  the per-frame pixel cap of the reference preprocessing), and a system message that casts the model as a
  radiologist shown the slices as a video and answering in JSON. ``openai``: 32 slices evenly spaced from
  slice 32 to slice 128 (of 160; the same fractions of other slice counts), each clipped to 0-400 and then
  scaled by the whole unclipped volume's minimum and maximum, with a radiologist system message. Both
  read the release's own question text: ``questions_nobbox_zeroshot.json`` for ``plain``,
  ``questions_nobbox_guided.json`` for ``guided`` and ``gt-crop`` (the package's release-format text,
  ``prompts.release_question_text``, when the release has no such file), with nothing added.

Outputs go to a resumable predictions JSONL (``predictions_io``): rerunning skips finished samples.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .. import prompts
from ..schema import QuestionSpec, get_question
from .api_client import KEY_ENV, OpenAIChatClient, ZeroShotError, is_local_url, redact_secrets  # noqa: F401
from .predictions_io import PredictionWriter

logger = logging.getLogger(__name__)

SETTINGS = ("plain", "guided", "gt-crop")
BACKENDS = ("hf", "openai")
PRESETS = ("package", "paper")

PAPER_FPS = 4.0
"""Frame rate the paper's Qwen runner gave the slice video."""
PAPER_WINDOW = (0.0, 400.0)
"""Intensity clip of the paper's inputs, before scaling to 0-255."""
PAPER_OPENAI_SLICES = 32
PAPER_OPENAI_RANGE = (32, 128, 160)
"""The paper's API runner: slices ``32..128`` (inclusive, evenly spaced) of a 160-slice volume."""
PAPER_SYSTEM_PROMPT = ("You are a radiologist. The sagittal slices of a knee MRI are played to you in order as a "
                       "video. Answer the question that follows with a JSON object.")
"""System turn of the paper preset's hf runner (the paper's role for the model, in the project's words)."""
PAPER_OPENAI_SYSTEM_PROMPT = ("You are a radiologist. You receive a question about a knee MRI together with "
                              "some of its sagittal slices as images.")
"""System turn of the paper preset's openai runner."""


# --- prompts -----------------------------------------------------------------------------------------

class ZeroShotPrompts:
    """Prompt text per (question, setting): the release's question files when present, else the project's."""

    def __init__(self, data_dir: Optional[str | os.PathLike] = None, preset: str = "package") -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown zero-shot preset {preset!r}; expected one of {list(PRESETS)}")
        self.preset = preset
        qdir = Path(data_dir) / "data" / "question_files" if data_dir is not None else None
        self.questions = self._read(qdir / "questions.json") if qdir else {}
        self.grades = self._read(qdir / "grade_dict.json") if qdir else {}
        # The release's own question files by prompt style (the paper preset's text).
        self.release = {style: self._read(qdir / name) if qdir else {}
                        for style, name in prompts.RELEASE_QUESTION_FILES.items()}

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ZeroShotError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, dict):
            raise ZeroShotError(f"{path}: expected an object keyed by question id, got {type(data).__name__}")
        return data

    def _grade_lines(self, spec: QuestionSpec) -> list[str]:
        release = self.grades.get(str(spec.question_id)) or {}
        lines = []
        for f in spec.fields:
            by_grade = release.get(f.key) or {}
            defs = "; ".join(f"{g} = {by_grade.get(str(g)) or prompts.grade_description(spec, f.key, g)}"
                             for g in f.grades)
            lines.append(f"- {f.key}: {defs}")
        return lines

    def prompt(self, question_id: int, setting: str, volume_shape: Optional[Sequence[int]] = None) -> str:
        """The prompt of one question; ``volume_shape`` adds the voxel grid the box indices refer to."""
        if setting not in SETTINGS:
            raise ValueError(f"unknown zero-shot setting {setting!r}; expected one of {list(SETTINGS)}")
        spec = get_question(question_id)
        if self.preset == "paper":
            return self._paper_prompt(spec, setting)
        release_text = self.questions.get(str(question_id))
        if release_text is None:
            text = prompts.question_prompt(spec, "plain" if setting == "plain" else "guided")
        elif setting == "plain":
            text = release_text
        else:
            text = "\n".join([
                release_text, "Grades:", *self._grade_lines(spec), *prompts.answer_instructions(spec)])
        notes = []
        if volume_shape is not None:
            s, h, w = (int(v) for v in volume_shape)
            notes.append(f"The volume has {s} sagittal slices of {h} x {w} voxels.")
        if setting == "gt-crop":
            notes.append("The images show only the region of interest, cropped from the volume.")
        return "\n".join(notes + [text])

    def _paper_prompt(self, spec: QuestionSpec, setting: str) -> str:
        style = "plain" if setting == "plain" else "guided"
        text = self.release[style].get(str(spec.question_id))
        if text is None:
            text = prompts.release_question_text(spec, style)
        elif not isinstance(text, str):
            raise ZeroShotError(f"{prompts.RELEASE_QUESTION_FILES[style]}: entry {spec.question_id} is "
                                f"{type(text).__name__}, expected the question text")
        if setting == "gt-crop":
            return "The images show only the region of interest, cropped from the volume.\n" + text
        return text


# --- frames as PNG -----------------------------------------------------------------------------------

def frames_to_png_b64(frames: Any) -> list[str]:
    """``(T, 3, H, W)`` uint8 frames -> base64 PNG strings (grayscale, first channel)."""
    from PIL import Image

    out = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame[0].numpy(), mode="L").save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


# --- the paper preset's frames ------------------------------------------------------------------------

def _to_uint8_rgb(scaled: Any) -> Any:
    """``(T, H, W)`` floats in 0-255 -> ``(T, 3, H, W)`` uint8, truncated like a cast of the 8-bit image."""
    import numpy as np
    import torch

    frames = torch.from_numpy(np.clip(np.nan_to_num(scaled), 0.0, 255.0).astype(np.uint8))
    return frames.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def paper_video_frames(volume: Any) -> Any:
    """Every slice of ``(S, H, W)`` -> ``(S, 3, H, W)`` uint8: clipped to ``PAPER_WINDOW``, then each slice
    min-max scaled on its own (a flat slice becomes black). Frames keep the stored size."""
    import numpy as np

    v = np.clip(np.asarray(volume, dtype=np.float32), *PAPER_WINDOW)
    lo = v.min(axis=(1, 2), keepdims=True)
    span = v.max(axis=(1, 2), keepdims=True) - lo
    return _to_uint8_rgb(np.divide(v - lo, span, out=np.zeros_like(v), where=span > 0) * 255.0)


def paper_openai_slice_indices(num_slices: int) -> Any:
    """The paper's 32 slice indices: evenly spaced over slices 32..128 of 160 (inclusive, rounded down), the
    same fractions of the slice axis for other counts."""
    import numpy as np

    if num_slices < 1:
        raise ValueError(f"a volume needs at least one slice, got {num_slices}")
    first, last, of = PAPER_OPENAI_RANGE
    idx = np.linspace(first * num_slices / of, last * num_slices / of, PAPER_OPENAI_SLICES).astype(np.int64)
    return np.minimum(idx, num_slices - 1)


def paper_openai_frames(volume: Any) -> tuple[Any, Any]:
    """(``(32, 3, H, W)`` uint8 frames, slice indices): each selected slice clipped to ``PAPER_WINDOW`` and then
    scaled by the whole volume's minimum and maximum before clipping."""
    import numpy as np

    v = np.asarray(volume, dtype=np.float32)
    idx = paper_openai_slice_indices(v.shape[0])
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else 1.0
    return _to_uint8_rgb((np.clip(v[idx], *PAPER_WINDOW) - lo) / span * 255.0), idx


def paper_hf_inputs(processor: Any, videos: Sequence[Any], texts: Sequence[str],
                    system: str = PAPER_SYSTEM_PROMPT) -> Any:
    """Model inputs of the paper preset: one chat per sample (system turn, the video, the question), the
    frames resized by the processor's own defaults, ``PAPER_FPS`` as the video's frame rate, left padding."""
    from transformers.video_utils import VideoMetadata

    chats = [processor.apply_chat_template(
        [{"role": "system", "content": system},
         {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}],
        tokenize=False, add_generation_prompt=True) for text in texts]
    processor.tokenizer.padding_side = "left"
    meta = [VideoMetadata(total_num_frames=int(v.shape[0]), fps=PAPER_FPS) for v in videos]
    # cap_pixels_per_frame: the per-frame pixel cap of the reference preprocessing (qwen-vl-utils).
    return processor(text=list(chats), videos=list(videos), video_metadata=meta, fps=PAPER_FPS,
                     do_sample_frames=False, cap_pixels_per_frame=True, padding=True, return_tensors="pt")


JSON_REPLY = ("Reply with one JSON object with the keys \"reasoning\" (a list of short steps), \"box\" "
              "([start_slice, end_slice, x_min, x_max, y_min, y_max]) and \"{key}\" (the grades as above).")


def openai_messages(prompt: str, images_b64: Sequence[str], slice_indices: Sequence[int],
                    system: Optional[str] = None) -> list[dict[str, Any]]:
    """Chat-completions messages: one user turn with the slice images, then the question."""
    intro = (f"The {len(images_b64)} images below are sagittal slices of a knee MRI, in order, at slice indices "
             f"{list(int(i) for i in slice_indices)}.")
    content: list[dict[str, Any]] = [{"type": "text", "text": intro}]
    content += [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b}"}} for b in images_b64]
    content.append({"type": "text", "text": prompt})
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


# --- runners -----------------------------------------------------------------------------------------

@dataclass
class ZeroShotResult:
    out: Path
    n_samples: int
    """Samples selected (after ``limit``)."""
    n_skipped_done: int
    """Samples already in ``out`` before this run."""
    n_written: int
    failed: dict[str, str] = field(default_factory=dict)
    """sample id -> error, for samples that got no prediction (a rerun retries them)."""


def default_frames_config(backend: str, frames: Optional[int] = None,
                          frame_size: Optional[Sequence[int]] = None) -> Any:
    """The paper's inputs: all slices as a video for ``hf``, 32 evenly spaced slices for ``openai``."""
    from ..models.slice.configuration_slice import SliceBaselineConfig

    num_frames = frames if frames is not None else (None if backend == "hf" else 32)
    size = tuple(frame_size) if frame_size is not None else ((224, 224) if backend == "hf" else (392, 392))
    return SliceBaselineConfig(num_frames=num_frames, frame_size=size)


def _row(sample: Any, output: str, backend: str, model: str, setting: str) -> dict[str, Any]:
    return {"sample_id": sample.sample_id, "output": output, "backend": backend, "model": model, "setting": setting}


def run_openai(samples: Sequence[Any], writer: PredictionWriter, client: OpenAIChatClient, prompt_fn: Callable[[Any, Sequence[int]], str],
               cfg: Any, setting: str, concurrency: int = 4, frames_fn: Optional[Callable[[Any], tuple[Any, Any]]] = None,
               system: Optional[str] = None) -> tuple[int, dict[str, str]]:
    """Send each sample in a thread pool of ``concurrency`` workers; write replies in completion order.

    ``frames_fn(volume) -> (frames, slice indices)`` replaces the config's frames (the paper preset);
    ``system`` replaces ``cfg.system_prompt``."""
    from ..data.io import load_volume
    from ..models.slice.processing_slice import crop_to_box, select_slices, volume_to_frames

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")

    def one(sample: Any) -> str:
        volume, meta = load_volume(sample.image_path)
        box = sample.box if setting == "gt-crop" else None
        if setting == "gt-crop" and box is None:
            raise ZeroShotError(f"sample {sample.sample_id}: gt-crop needs a reference box, the sample has none")
        seen = crop_to_box(volume, box, cfg.crop_margin) if box is not None else volume
        if frames_fn is not None:
            frames, indices = frames_fn(seen)
        else:
            frames, indices = volume_to_frames(seen, cfg), select_slices(seen.shape[0], cfg)
        messages = openai_messages(prompt_fn(sample, seen.shape), frames_to_png_b64(frames), indices,
                                   system if system is not None else cfg.system_prompt)
        return client.chat(messages)

    written, failed = 0, {}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending = {pool.submit(one, s): s for s in samples}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                sample = pending.pop(fut)
                try:
                    written += writer.write(_row(sample, fut.result(), "openai", client.model, setting))
                except Exception as e:  # one bad sample must not stop the others; it is reported
                    failed[sample.sample_id] = f"{type(e).__name__}: {e}"
                    logger.warning("sample %s failed: %s", sample.sample_id, failed[sample.sample_id])
    return written, failed


def _load_hf(model_dir: str | os.PathLike, attn_implementation: str) -> tuple[Any, Any]:
    """A local Qwen2-VL / Qwen2.5-VL checkpoint and its processor: bf16 on a GPU, float32 on the CPU."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..attention import NO_HUB_KERNELS, select_attn_implementation

    cuda = torch.cuda.is_available()
    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
        attn_implementation=select_attn_implementation(attn_implementation), **NO_HUB_KERNELS)
    return model.to("cuda" if cuda else "cpu").eval(), processor


def _run_batches(samples: Sequence[Any], writer: PredictionWriter, name: str, setting: str, batch_size: int,
                 answer: Callable[[list[Any]], list[str]]) -> tuple[int, dict[str, str]]:
    """``answer`` each chunk of ``batch_size`` samples and write the replies; a failing chunk is reported (and
    retried by a rerun), the others go on."""
    written, failed = 0, {}
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start:start + batch_size])
        try:
            texts = answer(chunk)
        except Exception as e:  # a bad volume fails its batch only; it is reported and retried on rerun
            for s in chunk:
                failed[s.sample_id] = f"{type(e).__name__}: {e}"
            logger.warning("batch starting at %s failed: %s", chunk[0].sample_id, e)
            continue
        written += writer.write_all(_row(s, t, "hf", name, setting) for s, t in zip(chunk, texts))
    return written, failed


def run_hf(samples: Sequence[Any], writer: PredictionWriter, model_dir: str | os.PathLike,
           prompt_fn: Callable[[Any, Sequence[int]], str], cfg: Any, setting: str, batch_size: int = 1,
           max_new_tokens: int = 1024, attn_implementation: str = "auto") -> tuple[int, dict[str, str]]:
    """Greedy generation with a local Qwen2-VL / Qwen2.5-VL checkpoint, slices as a video (package preset)."""
    from ..data.io import inspect_volume
    from ..families import get_family
    from ..families.slice import slice_predict_collate
    from ..models.slice.configuration_slice import SLICE_CONFIG_ATTR
    from ..models.slice.processing_slice import SliceCollator, configure_processor, crop_to_box
    from .generate import generate_answers

    model, processor = _load_hf(model_dir, attn_implementation)
    configure_processor(processor, cfg)
    # A stock checkpoint read through the slice family's decoding: its frame settings are the zero-shot ones.
    setattr(model.config, SLICE_CONFIG_ATTR, cfg.to_dict())
    family = get_family("slice")

    def sample_prompt(sample: Any) -> str:
        shape = inspect_volume(sample.image_path).shape
        if setting == "gt-crop":
            # The prompt describes the grid the model sees: the crop, not the whole volume.
            import numpy as np
            shape = crop_to_box(np.empty(shape, dtype=np.uint8), sample.box, cfg.crop_margin).shape
        return prompt_fn(sample, shape)

    collate = slice_predict_collate(SliceCollator(processor, cfg, train=False, prompt_fn=sample_prompt,
                                                  crop=setting == "gt-crop"))

    def answer(chunk: list[Any]) -> list[str]:
        batch, infos = collate(chunk)
        return generate_answers(model, processor, family, batch, [i.question_id for i in infos],
                                [i.orig_shape for i in infos], constrained=False, max_new_tokens=max_new_tokens)
    return _run_batches(samples, writer, str(model_dir), setting, batch_size, answer)


def run_hf_paper(samples: Sequence[Any], writer: PredictionWriter, model_dir: str | os.PathLike,
                 prompt_fn: Callable[[Any, Sequence[int]], str], setting: str, crop_margin: int = 4,
                 batch_size: int = 1, max_new_tokens: int = 1024,
                 attn_implementation: str = "auto") -> tuple[int, dict[str, str]]:
    """The paper preset's hf runner: ``paper_video_frames`` through ``paper_hf_inputs``, greedy decoding, the
    reply decoded as the published script does (special tokens skipped)."""
    from ..data.io import load_volume
    from ..models.slice.processing_slice import crop_to_box
    from .generate import generate_answers

    model, processor = _load_hf(model_dir, attn_implementation)

    def answer(chunk: list[Any]) -> list[str]:
        videos, texts = [], []
        for s in chunk:
            volume, _ = load_volume(s.image_path)
            if setting == "gt-crop":
                if s.box is None:
                    raise ZeroShotError(f"sample {s.sample_id}: gt-crop needs a reference box, the sample has none")
                volume = crop_to_box(volume, s.box, crop_margin)
            videos.append(paper_video_frames(volume))
            texts.append(prompt_fn(s, volume.shape))
        batch = dict(paper_hf_inputs(processor, videos, texts))
        return generate_answers(model, processor, None, batch, [s.question_id for s in chunk], [], constrained=False,
                                max_new_tokens=max_new_tokens,
                                decode=lambda ids: processor.batch_decode(ids, skip_special_tokens=True))
    return _run_batches(samples, writer, str(model_dir), setting, batch_size, answer)


def run_zeroshot(backend: str, model: str, data_dir: str | os.PathLike, split: str, out: str | os.PathLike,
                 setting: str = "plain", base_url: Optional[str] = None, limit: Optional[int] = None,
                 frames: Optional[int] = None, frame_size: Optional[Sequence[int]] = None, concurrency: int = 4,
                 timeout: float = 120.0, max_retries: int = 4, batch_size: int = 1, max_new_tokens: int = 1024,
                 env: Mapping[str, str] = os.environ, allow_no_key: bool = False,
                 preset: str = "package", images: Optional[str | os.PathLike] = None) -> ZeroShotResult:
    """Run one zero-shot setting over a split (the first ``limit`` samples), appending to ``out``.

    ``openai`` reads its key from ``env["OPENAI_API_KEY"]``. Without one, only a local server (localhost or
    a loopback address) is asked, unless ``allow_no_key`` says the remote endpoint needs none.
    ``preset``: ``package`` (the package's frames and prompts) or ``paper`` (the published inputs; see the
    module docstring), which fixes the frames, so ``frames`` / ``frame_size`` must stay None with it.
    ``images``: where volumes are found by name when the release's written paths do not exist.
    """
    from ..data.release import iter_samples

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {list(SETTINGS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")
    if preset == "paper" and (frames is not None or frame_size is not None):
        raise ValueError("--preset paper fixes the frames (every slice for hf, the paper's 32 for openai); "
                         "drop --frames / --frame-size or use --preset package")
    if backend == "openai" and not base_url:
        raise ValueError("--backend openai needs --base-url (an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1)")
    api_key = env.get(KEY_ENV) or None
    if backend == "openai" and api_key is None:
        if not (allow_no_key or is_local_url(base_url)):
            raise ValueError(f"{KEY_ENV} is not set and {base_url} is not a local server; set {KEY_ENV} to the "
                             f"endpoint's API key (or pass --allow-no-key for an endpoint that needs none)")
        logger.info("%s is not set: requests to %s carry no Authorization header", KEY_ENV, base_url)
    samples = list(iter_samples(data_dir, split, images=images))
    if limit is not None:
        samples = samples[:limit]
    cfg = default_frames_config(backend, frames, frame_size)
    texts = ZeroShotPrompts(data_dir, preset)
    prompt_fn = lambda s, shape: texts.prompt(s.question_id, setting, shape)  # noqa: E731
    with PredictionWriter(out) as writer:
        todo = [s for s in samples if s.sample_id not in writer.done]
        skipped = len(samples) - len(todo)
        logger.info("zeroshot %s %s %s: %d samples, %d already in %s", backend, model, setting, len(samples), skipped, out)
        if backend == "openai":
            client = OpenAIChatClient(base_url=base_url, model=model, api_key=api_key,
                                      timeout=timeout, max_retries=max_retries)
            if preset == "paper":  # the release's text already asks for the JSON object
                written, failed = run_openai(todo, writer, client, prompt_fn, cfg, setting, concurrency,
                                             frames_fn=paper_openai_frames, system=PAPER_OPENAI_SYSTEM_PROMPT)
            else:
                if client.json_mode:
                    prompt_fn = _with_json_reply(prompt_fn)
                written, failed = run_openai(todo, writer, client, prompt_fn, cfg, setting, concurrency)
        elif preset == "paper":
            written, failed = run_hf_paper(todo, writer, model, prompt_fn, setting, cfg.crop_margin, batch_size,
                                           max_new_tokens)
        else:
            written, failed = run_hf(todo, writer, model, prompt_fn, cfg, setting, batch_size, max_new_tokens)
    return ZeroShotResult(out=Path(out), n_samples=len(samples), n_skipped_done=skipped, n_written=written,
                          failed=failed)


def _with_json_reply(prompt_fn: Callable[[Any, Sequence[int]], str]) -> Callable[[Any, Sequence[int]], str]:
    """JSON response mode needs a JSON-only answer: ask for reasoning, box and grades as one object."""
    def fn(sample: Any, shape: Sequence[int]) -> str:
        return prompt_fn(sample, shape) + "\n" + JSON_REPLY.replace("{key}", get_question(sample.question_id).finding_key)
    return fn
