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
  API key is read from ``OPENAI_API_KEY`` and never logged. Only the standard library talks HTTP.

Outputs go to a resumable predictions JSONL (``predictions_io``): rerunning skips finished samples.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .. import prompts
from ..schema import QuestionSpec, get_question
from .predictions_io import PredictionWriter

logger = logging.getLogger(__name__)

SETTINGS = ("plain", "guided", "gt-crop")
BACKENDS = ("hf", "openai")


class ZeroShotError(RuntimeError):
    """A request that failed for good (after retries) or a response that could not be used."""


# --- prompts -----------------------------------------------------------------------------------------

class ZeroShotPrompts:
    """Prompt text per (question, setting): the release's question files when present, else the project's."""

    def __init__(self, data_dir: Optional[str | os.PathLike] = None) -> None:
        qdir = Path(data_dir) / "data" / "question_files" if data_dir is not None else None
        self.questions = self._read(qdir / "questions.json") if qdir else {}
        self.grades = self._read(qdir / "grade_dict.json") if qdir else {}

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


# --- OpenAI-compatible client ------------------------------------------------------------------------

def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


@dataclass
class OpenAIChatClient:
    """Minimal chat-completions client (``POST {base_url}/chat/completions``) with retries."""

    base_url: str
    model: str
    api_key: Optional[str] = field(default=None, repr=False)
    timeout: float = 120.0
    """Seconds per request before it is abandoned (and retried)."""
    max_retries: int = 4
    """Retries after the first attempt on 429, 5xx, timeouts, network errors and malformed replies."""
    backoff: float = 1.0
    """First retry delay in seconds; doubles per retry (with jitter), capped at ``max_backoff``."""
    max_backoff: float = 60.0
    json_mode: bool = True
    """Ask for ``response_format: json_object``; dropped for good when the server rejects it (HTTP 400/422)."""
    max_tokens: Optional[int] = None
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ZeroShotError(f"{self.url}: response is not JSON: {raw[:120]!r}") from None

    @staticmethod
    def _content(data: Any, url: str) -> str:
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ZeroShotError(f"{url}: response has no choices[0].message.content: {str(data)[:160]}") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ZeroShotError(f"{url}: message content is {type(content).__name__}, expected text")
        return content

    def _delay(self, attempt: int, retry_after: Optional[float] = None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        return min(self.backoff * 2 ** attempt, self.max_backoff) * (0.5 + random.random() / 2)

    def chat(self, messages: list[dict[str, Any]]) -> str:
        """The assistant's reply text; raises ZeroShotError when every attempt failed."""
        last = ""
        attempt = 0
        while True:
            body: dict[str, Any] = {"model": self.model, "messages": messages}
            if self.max_tokens is not None:
                body["max_tokens"] = self.max_tokens
            if self.json_mode:
                body["response_format"] = {"type": "json_object"}
            retry_after = None
            try:
                return self._content(self._post(body), self.url)
            except urllib.error.HTTPError as e:
                detail = e.read()[:200].decode("utf-8", "replace")
                if e.code in (400, 422) and self.json_mode:
                    logger.info("%s rejected response_format json_object (HTTP %d); retrying without it", self.url, e.code)
                    self.json_mode = False
                    continue  # not a retry: the request itself changes
                if e.code != 429 and not 500 <= e.code < 600:
                    raise ZeroShotError(f"{self.url}: HTTP {e.code}: {detail}") from None
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except ZeroShotError as e:
                last = str(e)
            if attempt >= self.max_retries:
                raise ZeroShotError(f"{self.url}: failed after {attempt + 1} attempts; last error: {last}")
            delay = self._delay(attempt, retry_after)
            logger.info("%s: %s; retry %d/%d in %.1fs", self.url, last, attempt + 1, self.max_retries, delay)
            self.sleep(delay)
            attempt += 1


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
               cfg: Any, setting: str, concurrency: int = 4) -> tuple[int, dict[str, str]]:
    """Send each sample in a thread pool of ``concurrency`` workers; write replies in completion order."""
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
        messages = openai_messages(prompt_fn(sample, seen.shape), frames_to_png_b64(volume_to_frames(seen, cfg)),
                                   select_slices(seen.shape[0], cfg), cfg.system_prompt)
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


def run_hf(samples: Sequence[Any], writer: PredictionWriter, model_dir: str | os.PathLike,
           prompt_fn: Callable[[Any, Sequence[int]], str], cfg: Any, setting: str, batch_size: int = 1,
           max_new_tokens: int = 1024, attn_implementation: str = "auto") -> tuple[int, dict[str, str]]:
    """Greedy generation with a local Qwen2-VL / Qwen2.5-VL checkpoint, slices as a video."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..attention import select_attn_implementation
    from ..data.io import inspect_volume
    from ..families import get_family
    from ..families.slice import slice_predict_collate
    from ..models.slice.configuration_slice import SLICE_CONFIG_ATTR
    from ..models.slice.processing_slice import SliceCollator, configure_processor, crop_to_box
    from .generate import generate_answers

    cuda = torch.cuda.is_available()
    processor = configure_processor(AutoProcessor.from_pretrained(model_dir), cfg)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
        attn_implementation=select_attn_implementation(attn_implementation))
    if cuda:
        model.to("cuda")
    model.eval()
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
    written, failed = 0, {}
    name = str(model_dir)
    for start in range(0, len(samples), batch_size):
        chunk = list(samples[start:start + batch_size])
        try:
            batch, infos = collate(chunk)
            texts = generate_answers(model, processor, family, batch, [i.question_id for i in infos],
                                     [i.orig_shape for i in infos], constrained=False, max_new_tokens=max_new_tokens)
        except Exception as e:  # a bad volume fails its batch only; it is reported and retried on rerun
            for s in chunk:
                failed[s.sample_id] = f"{type(e).__name__}: {e}"
            logger.warning("batch starting at %s failed: %s", chunk[0].sample_id, e)
            continue
        written += writer.write_all(_row(s, t, "hf", name, setting) for s, t in zip(chunk, texts))
    return written, failed


def run_zeroshot(backend: str, model: str, data_dir: str | os.PathLike, split: str, out: str | os.PathLike,
                 setting: str = "plain", base_url: Optional[str] = None, limit: Optional[int] = None,
                 frames: Optional[int] = None, frame_size: Optional[Sequence[int]] = None, concurrency: int = 4,
                 timeout: float = 120.0, max_retries: int = 4, batch_size: int = 1, max_new_tokens: int = 1024,
                 env: Mapping[str, str] = os.environ) -> ZeroShotResult:
    """Run one zero-shot setting over a split (the first ``limit`` samples), appending to ``out``."""
    from ..data.release import iter_samples

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; expected one of {list(SETTINGS)}")
    if backend == "openai" and not base_url:
        raise ValueError("--backend openai needs --base-url (an OpenAI-compatible endpoint, e.g. https://api.openai.com/v1)")
    samples = list(iter_samples(data_dir, split))
    if limit is not None:
        samples = samples[:limit]
    cfg = default_frames_config(backend, frames, frame_size)
    texts = ZeroShotPrompts(data_dir)
    prompt_fn = lambda s, shape: texts.prompt(s.question_id, setting, shape)  # noqa: E731
    with PredictionWriter(out) as writer:
        todo = [s for s in samples if s.sample_id not in writer.done]
        skipped = len(samples) - len(todo)
        logger.info("zeroshot %s %s %s: %d samples, %d already in %s", backend, model, setting, len(samples), skipped, out)
        if backend == "openai":
            client = OpenAIChatClient(base_url=base_url, model=model, api_key=env.get("OPENAI_API_KEY"),
                                      timeout=timeout, max_retries=max_retries)
            if client.json_mode:
                prompt_fn = _with_json_reply(prompt_fn)
            written, failed = run_openai(todo, writer, client, prompt_fn, cfg, setting, concurrency)
        else:
            written, failed = run_hf(todo, writer, model, prompt_fn, cfg, setting, batch_size, max_new_tokens)
    return ZeroShotResult(out=Path(out), n_samples=len(samples), n_skipped_done=skipped, n_written=written,
                          failed=failed)


def _with_json_reply(prompt_fn: Callable[[Any, Sequence[int]], str]) -> Callable[[Any, Sequence[int]], str]:
    """JSON response mode needs a JSON-only answer: ask for reasoning, box and grades as one object."""
    def fn(sample: Any, shape: Sequence[int]) -> str:
        return prompt_fn(sample, shape) + "\n" + JSON_REPLY.replace("{key}", get_question(sample.question_id).finding_key)
    return fn
