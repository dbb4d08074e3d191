"""Zero-shot runners against a fake OpenAI-compatible server on 127.0.0.1 and a tiny local Qwen2.5-VL."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from reasonknee3d import prompts
from reasonknee3d.data.release import iter_samples
from reasonknee3d.evaluation.predictions_io import read_predictions
from reasonknee3d.evaluation.zeroshot import OpenAIChatClient, ZeroShotError, ZeroShotPrompts, run_zeroshot
from reasonknee3d.schema import get_question

KEY = "sk-test-secret-123"
FAST = dict(frames=2, frame_size=(28, 28))


def ok(content: str = '{"box": [1, 2, 3, 4, 5, 6]}') -> tuple:
    return 200, {}, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


class FakeServer:
    """Chat-completions endpoint whose reply to request n is ``responder(body, n)``: (status, headers, bytes)
    or ("sleep", seconds, reply)."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict, dict]] = []
        self.responder: Callable[[dict, int], Any] = lambda body, n: ok()
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append((body, dict(self.headers)))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    reply = server.responder(body, n)
                    if reply[0] == "sleep":
                        time.sleep(reply[1])
                        reply = reply[2]
                    status, headers, data = reply
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    from reasonknee3d.data.synth import write_synthetic_release
    root = tmp_path_factory.mktemp("release")
    write_synthetic_release(root, n_volumes=3, shape=(16, 32, 32), seed=0, questions=[1, 30], overwrite=True)
    return root


def client(server: FakeServer, **kw: Any) -> OpenAIChatClient:
    return OpenAIChatClient(base_url=server.url, model="fake-o1", api_key=KEY, sleep=lambda s: None, **kw)


def text_of(body: dict) -> str:
    return " ".join(p.get("text", "") for m in body["messages"] for p in m["content"] if isinstance(p, dict))


def test_prompts_from_release_files_or_project(release, tmp_path):
    spec = get_question(30)
    own = ZeroShotPrompts(None)
    assert own.prompt(30, "plain") == prompts.question_prompt(spec, "plain")
    assert own.prompt(30, "guided") == prompts.question_prompt(spec, "guided")
    rel = ZeroShotPrompts(release)
    questions = json.loads((release / "data/question_files/questions.json").read_text())
    assert rel.prompt(30, "plain", (16, 32, 32)) == "The volume has 16 sagittal slices of 32 x 32 voxels.\n" + questions["30"]
    guided = rel.prompt(30, "guided")
    grade_text = json.loads((release / "data/question_files/grade_dict.json").read_text())["30"]
    assert guided.startswith(questions["30"]) and "Location: <|box_start|>" in guided
    assert all(desc in guided for desc in next(iter(grade_text.values())).values())
    assert "cropped" in rel.prompt(30, "gt-crop") and "cropped" not in guided
    with pytest.raises(ValueError, match="setting"):
        rel.prompt(30, "fewshot")


def test_429_then_success_honours_retry_after(server, caplog):
    server.responder = lambda body, n: (429, {"Retry-After": "0"}, b"slow down") if n == 0 else ok("fine")
    slept: list[float] = []
    c = client(server)
    c.sleep = slept.append
    with caplog.at_level(logging.DEBUG):
        assert c.chat([{"role": "user", "content": "JSON please"}]) == "fine"
    assert len(server.requests) == 2 and slept == [0.0]
    assert server.requests[0][1]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in caplog.text and KEY not in repr(c)
    assert server.requests[0][0]["response_format"] == {"type": "json_object"}


def test_timeout_is_retried_then_gives_up(server):
    server.responder = lambda body, n: ("sleep", 1.0, ok("late")) if n == 0 else ok("on time")
    assert client(server, timeout=0.3).chat([{"role": "user", "content": "x"}]) == "on time"
    server.requests.clear()
    server.responder = lambda body, n: ("sleep", 1.0, ok("late"))
    with pytest.raises(ZeroShotError, match="failed after 2 attempts"):
        client(server, timeout=0.2, max_retries=1).chat([{"role": "user", "content": "x"}])


def test_malformed_responses(server):
    server.responder = lambda body, n: (200, {}, b"<html>oops</html>") if n == 0 else (200, {}, b'{"choices": []}')
    with pytest.raises(ZeroShotError, match="no choices"):
        client(server, max_retries=1).chat([{"role": "user", "content": "x"}])
    assert len(server.requests) == 2
    server.requests.clear()
    server.responder = lambda body, n: (503, {}, b"busy") if n < 2 else ok("back")
    assert client(server).chat([{"role": "user", "content": "x"}]) == "back"
    server.requests.clear()
    server.responder = lambda body, n: (401, {}, b"bad key")
    with pytest.raises(ZeroShotError, match="HTTP 401"):
        client(server).chat([{"role": "user", "content": "x"}])
    assert len(server.requests) == 1  # client errors are not retried


def test_json_format_falls_back_when_rejected(server):
    server.responder = lambda body, n: ((400, {}, b"response_format not supported")
                                        if "response_format" in body else ok("plain text"))
    c = client(server)
    assert c.chat([{"role": "user", "content": "x"}]) == "plain text"
    assert c.chat([{"role": "user", "content": "y"}]) == "plain text"
    assert [("response_format" in b) for b, _ in server.requests] == [True, False, False]


def test_run_openai_concurrency_failures_and_resume(server, release, tmp_path):
    samples = list(iter_samples(release, "train"))
    q30 = get_question(30).finding_key

    def responder(body: dict, n: int) -> Any:
        time.sleep(0.05)  # let requests overlap
        return (200, {}, b"garbage") if q30 in text_of(body) else ok()
    server.responder = responder
    out = tmp_path / "pred.jsonl"
    env = {"OPENAI_API_KEY": KEY}
    res = run_zeroshot("openai", "fake-o1", release, "train", out, setting="guided", base_url=server.url,
                       concurrency=3, max_retries=0, env=env, **FAST)
    n30 = sum(s.question_id == 30 for s in samples)
    assert res.n_written == len(samples) - n30 and len(res.failed) == n30
    assert 1 < server.max_in_flight <= 3
    body = server.requests[0][0]
    images = [p for p in body["messages"][-1]["content"] if p["type"] == "image_url"]
    assert len(images) == 2 and images[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "slice indices [4, 12]" in text_of(body)
    # Rerun: only the failed samples are asked again, and the file ends with every sample exactly once.
    server.requests.clear()
    server.responder = lambda body, n: ok()
    res = run_zeroshot("openai", "fake-o1", release, "train", out, setting="guided", base_url=server.url, env=env, **FAST)
    assert len(server.requests) == n30 and res.n_skipped_done == len(samples) - n30
    ids = [r["sample_id"] for r in read_predictions(out)]
    assert sorted(ids) == sorted(s.sample_id for s in samples)


def test_gt_crop_sends_the_cropped_region(server, release, tmp_path):
    res = run_zeroshot("openai", "fake-o1", release, "train", tmp_path / "p.jsonl", setting="gt-crop",
                       base_url=server.url, limit=1, env={}, **FAST)
    assert res.n_written == 1
    sample = next(iter(iter_samples(release, "train")))
    b = sample.box
    crop_shape = [min(hi + 4, n - 1) - max(lo - 4, 0) + 1 for lo, hi, n in zip(b[::2], b[1::2], (16, 32, 32))]
    body, headers = server.requests[0]
    assert f"The volume has {crop_shape[0]} sagittal slices of {crop_shape[1]} x {crop_shape[2]} voxels" in text_of(body)
    assert "Authorization" not in headers  # no key in the environment: none sent


def test_killed_run_resumes_without_duplicates(server, release, tmp_path):
    server.responder = lambda body, n: ("sleep", 0.3, ok())
    out = tmp_path / "pred.jsonl"
    cmd = [sys.executable, "-m", "reasonknee3d", "zeroshot", "--backend", "openai", "--model", "fake", "--data",
           str(release), "--split", "train", "--out", str(out), "--base-url", server.url, "--concurrency", "1",
           "--frames", "2", "--frame-size", "28", "28"]
    env = {**os.environ, "OPENAI_API_KEY": KEY}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not out.is_file() or len(out.read_text().splitlines()) < 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    written = len(read_predictions(out))
    n = len(list(iter_samples(release, "train")))
    assert 2 <= written < n
    with open(out, "a") as fh:
        fh.write('{"sample_id": "torn')  # a write cut off by the kill
    server.requests.clear()
    server.responder = lambda body, n: ok()
    res = run_zeroshot("openai", "fake", release, "train", out, base_url=server.url, env=env, **FAST)
    assert res.n_skipped_done == written and res.n_written == n - written == len(server.requests)
    ids = [r["sample_id"] for r in read_predictions(out)]
    assert len(ids) == len(set(ids)) == n
    assert out.read_text().endswith("\n")


def test_hf_backend_with_a_tiny_local_checkpoint(release, tmp_path):
    from reasonknee3d.models.tiny_qwen import default_tiny_qwen_dir

    tiny = default_tiny_qwen_dir(tmp_path)
    out = tmp_path / "hf.jsonl"
    for setting in ("plain", "gt-crop"):
        res = run_zeroshot("hf", str(tiny), release, "train", out.with_suffix(f".{setting}.jsonl"), setting=setting,
                           limit=2, max_new_tokens=3, batch_size=2, frames=2, frame_size=(56, 56))
        assert res.n_written == 2 and not res.failed
        rows = read_predictions(out.with_suffix(f".{setting}.jsonl"))
        assert [r["setting"] for r in rows] == [setting] * 2 and all(isinstance(r["output"], str) for r in rows)
    again = run_zeroshot("hf", str(tiny), release, "train", out.with_suffix(".plain.jsonl"), limit=2,
                         max_new_tokens=3, frames=2, frame_size=(56, 56))
    assert again.n_written == 0 and again.n_skipped_done == 2


# --- the paper preset ----------------------------------------------------------------------------------

def test_paper_video_frames_scale_each_slice_on_its_own():
    import numpy as np

    from reasonknee3d.evaluation.zeroshot import paper_video_frames

    rng = np.random.default_rng(0)
    vol = rng.uniform(0, 900, size=(7, 20, 24)).astype(np.float32)
    vol[2] = rng.uniform(100, 150, size=(20, 24))  # a dim slice still spans 0-255 on its own
    vol[5] = 42.0  # a flat slice
    frames = paper_video_frames(vol)
    assert tuple(frames.shape) == (7, 3, 20, 24) and frames.dtype.__str__() == "torch.uint8"
    assert bool((frames[:, 0] == frames[:, 1]).all() and (frames[:, 0] == frames[:, 2]).all())
    for i in (0, 1, 2, 3, 4, 6):
        s = np.clip(vol[i], 0, 400)
        want = ((s - s.min()) / (s.max() - s.min()) * 255).astype(np.uint8)
        assert np.array_equal(frames[i, 0].numpy(), want), i
        assert frames[i, 0].max() == 255 and frames[i, 0].min() == 0
    assert frames[5].max() == 0


def test_paper_openai_slices_and_whole_volume_scaling():
    import numpy as np

    from reasonknee3d.evaluation.zeroshot import paper_openai_frames, paper_openai_slice_indices

    idx = paper_openai_slice_indices(160)
    assert idx.tolist() == np.linspace(32, 128, 32, dtype=int).tolist()
    assert len(idx) == 32 and idx[0] == 32 and idx[-1] == 128 and idx[1] == 35
    small = paper_openai_slice_indices(16)
    assert len(small) == 32 and small[0] == 3 and small[-1] == 12
    vol = np.full((160, 8, 8), 100.0, dtype=np.float32)
    vol[0, 0, 0] = 1000.0  # outside the selected slices, yet it sets the scale
    vol[32, 0, 0] = 600.0  # clipped to 400 first
    vol[32, 0, 1] = 20.0
    frames, used = paper_openai_frames(vol)
    assert used.tolist() == idx.tolist() and tuple(frames.shape) == (32, 3, 8, 8)
    lo, hi = 20.0, 1000.0
    assert frames[0, 0, 0, 0] == int((400 - lo) / (hi - lo) * 255)
    assert frames[0, 0, 0, 1] == 0 and frames[0, 0, 1, 1] == int((100 - lo) / (hi - lo) * 255)


class _Spy:
    """A processor that records the keyword arguments of its calls."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        return self.inner(*args, **kwargs)


def test_paper_hf_inputs_video_at_4_fps_default_size_system_and_question(tmp_path):
    import numpy as np
    from transformers import AutoProcessor

    from reasonknee3d.evaluation.zeroshot import PAPER_SYSTEM_PROMPT, paper_hf_inputs, paper_video_frames
    from reasonknee3d.models.tiny_qwen import default_tiny_qwen_dir

    processor = _Spy(AutoProcessor.from_pretrained(default_tiny_qwen_dir(tmp_path)))
    vol = np.random.default_rng(1).uniform(0, 500, size=(10, 384, 384)).astype(np.float32)
    frames = paper_video_frames(vol)
    assert tuple(frames.shape) == (10, 3, 384, 384)  # every slice, stored size
    question = "In this knee MRI, grade the osteophyte."
    batch = paper_hf_inputs(processor, [frames], [question])
    assert processor.calls[0]["fps"] == 4.0 and processor.calls[0]["video_metadata"][0].fps == 4.0
    assert "size" not in processor.calls[0]  # the processor's own default size
    # 10 frames -> 5 temporal patches; 384 px -> 392 px = 28 patches of 14 per side.
    assert batch["video_grid_thw"].tolist() == [[5, 28, 28]]
    assert batch["second_per_grid_ts"].tolist() == [0.5]  # temporal_patch_size 2 / 4 fps
    text = processor.batch_decode(batch["input_ids"])[0]
    assert PAPER_SYSTEM_PROMPT in text and question in text and "radiologist" in PAPER_SYSTEM_PROMPT
    assert text.count("<|video_pad|>") == 5 * 14 * 14


def test_paper_preset_prompts_are_the_release_question_files(release):
    files = release / "data/question_files"
    zs = json.loads((files / "questions_nobbox_zeroshot.json").read_text())
    guided = json.loads((files / "questions_nobbox_guided.json").read_text())
    assert sorted(zs, key=int) == ["1", "30"] and '{"MOAKS_scores": {"patella superior osteophyte"' in zs["30"]
    rel = ZeroShotPrompts(release, "paper")
    assert rel.prompt(30, "plain", (16, 32, 32)) == zs["30"]
    assert rel.prompt(30, "guided") == guided["30"] != zs["30"]
    assert rel.prompt(30, "gt-crop").endswith(guided["30"]) and "cropped" in rel.prompt(30, "gt-crop")
    own = ZeroShotPrompts(None, "paper")
    assert own.prompt(44, "plain") == prompts.release_question_text(get_question(44), "plain")
    with pytest.raises(ValueError, match="preset"):
        ZeroShotPrompts(release, "fancy")


def test_paper_preset_runs_end_to_end(server, release, tmp_path):
    from reasonknee3d.evaluation.zeroshot import PAPER_OPENAI_SYSTEM_PROMPT
    from reasonknee3d.models.tiny_qwen import default_tiny_qwen_dir

    res = run_zeroshot("openai", "fake-o1", release, "train", tmp_path / "o.jsonl", base_url=server.url, limit=1,
                       env={}, preset="paper")
    assert res.n_written == 1
    body, _ = server.requests[0]
    assert body["messages"][0] == {"role": "system", "content": PAPER_OPENAI_SYSTEM_PROMPT}
    images = [p for p in body["messages"][1]["content"] if p["type"] == "image_url"]
    assert len(images) == 32 and "JSON object with the keys" not in text_of(body)
    sample = next(iter(iter_samples(release, "train")))
    zs = json.loads((release / "data/question_files/questions_nobbox_zeroshot.json").read_text())
    assert zs[str(sample.question_id)] in text_of(body)
    with pytest.raises(ValueError, match="preset paper fixes the frames"):
        run_zeroshot("hf", "x", release, "train", tmp_path / "x.jsonl", preset="paper", frames=4)
    out = tmp_path / "hf.jsonl"
    res = run_zeroshot("hf", str(default_tiny_qwen_dir(tmp_path)), release, "train", out, setting="guided", limit=2,
                       batch_size=2, max_new_tokens=3, preset="paper")
    assert res.n_written == 2 and not res.failed
