"""OpenAIChatClient against misbehaving local servers: redirects, trickling replies, oversized replies,
error bodies that echo the key, and a missing key for a remote endpoint."""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from reasonknee3d import cli
from reasonknee3d.evaluation.zeroshot import OpenAIChatClient, ZeroShotError, redact_secrets, run_zeroshot

KEY = "sk-test-0123456789abcdef"
MESSAGES = [{"role": "user", "content": "x"}]
OK_BODY = json.dumps({"choices": [{"message": {"role": "assistant", "content": "fine"}}]}).encode()


class Server:
    """HTTP server on ``host``, port 0. ``behaviour(handler, n)`` writes the raw reply to request n; every
    request's headers are recorded. Handlers stop on their own (bounded loops, client disconnects)."""

    def __init__(self, behaviour: Callable[[BaseHTTPRequestHandler, int], None], host: str = "127.0.0.1") -> None:
        self.headers: list[dict[str, str]] = []
        self.behaviour = behaviour
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                n = len(server.headers)
                server.headers.append(dict(self.headers))
                try:
                    server.behaviour(self, n)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.origin = f"http://{host}:{self.httpd.server_address[1]}"
        self.url = self.origin + "/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def reply(status: int, body: bytes = OK_BODY, headers: dict[str, str] | None = None,
          length: bool = True) -> Callable[[BaseHTTPRequestHandler, int], None]:
    def write(h: BaseHTTPRequestHandler, n: int) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if length:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return write


@pytest.fixture
def servers():
    made: list[Server] = []

    def make(behaviour: Callable, host: str = "127.0.0.1") -> Server:
        made.append(Server(behaviour, host))
        return made[-1]
    yield make
    for s in made:
        s.close()


def other_host() -> str:
    """A second loopback address when this machine binds one (Linux routes all of 127/8), else 127.0.0.1."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
        return "127.0.0.2"
    except OSError:
        return "127.0.0.1"  # then the second server differs by port, which is another origin too


def client(url: str, **kw: Any) -> OpenAIChatClient:
    return OpenAIChatClient(base_url=url, model="m", api_key=KEY, sleep=lambda s: None, **kw)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirect_to_another_host_is_refused_and_sends_nothing_there(servers, code):
    target = servers(reply(200), host=other_host())
    origin = servers(reply(code, b"moved", {"Location": target.url + "/chat/completions"}))
    with pytest.raises(ZeroShotError, match="redirect to another host refused") as e:
        client(origin.url).chat(MESSAGES)
    msg = str(e.value)
    here, there = origin.origin.split("//")[1], target.origin.split("//")[1]
    assert f"from http://{here}" in msg and f"to http://{there}" in msg and KEY not in msg
    assert target.headers == []  # the other host got no request, so no Authorization header
    assert len(origin.headers) == 1 and origin.headers[0]["Authorization"] == f"Bearer {KEY}"  # not retried


def test_same_host_redirect_is_refused_too(servers):
    s = servers(reply(302, b"", {"Location": "/v2/chat/completions"}))
    with pytest.raises(ZeroShotError,
                       match=r"HTTP 302 redirect to http://127\.0\.0\.1:\d+/v2/chat/completions refused"):
        client(s.url).chat(MESSAGES)
    assert len(s.headers) == 1


def trickle(header_first: bool, every: float = 0.05, limit_s: float = 3.0) -> Callable:
    """A reply sent one byte per ``every`` seconds (the status line too when ``header_first``)."""
    def write(h: BaseHTTPRequestHandler, n: int) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(OK_BODY)}\r\n\r\n".encode()
        slow = head + OK_BODY if header_first else OK_BODY
        if not header_first:
            h.wfile.write(head)
        end = time.monotonic() + limit_s
        for i in range(len(slow)):
            if time.monotonic() > end:
                return
            h.wfile.write(slow[i:i + 1])
            time.sleep(every)
    return write


@pytest.mark.parametrize("header_first", [False, True], ids=["body", "status-line"])
def test_trickling_server_hits_the_overall_deadline(servers, header_first):
    s = servers(trickle(header_first))
    start = time.monotonic()
    with pytest.raises(ZeroShotError, match="failed after 1 attempts; last error: TimeoutError: no complete reply "
                                            "within the request timeout of 0.5 s"):
        client(s.url, timeout=0.5, max_retries=0).chat(MESSAGES)
    elapsed = time.monotonic() - start
    # Each byte arrives well within the timeout, so only an overall deadline stops this; the whole reply
    # would take len(reply) * 0.05 s (> 3 s).
    assert 0.45 <= elapsed < 1.0, elapsed


def test_deadline_timeout_is_retried(servers):
    s = servers(lambda h, n: trickle(False)(h, n) if n == 0 else reply(200)(h, n))
    assert client(s.url, timeout=0.5, max_retries=1).chat(MESSAGES) == "fine"
    assert len(s.headers) == 2


@pytest.mark.parametrize("length", [True, False], ids=["content-length", "until-close"])
def test_oversized_reply_is_rejected_without_retry(servers, length):
    big = json.dumps({"choices": [{"message": {"content": "a" * 5000}}]}).encode()
    s = servers(reply(200, big, length=length))
    with pytest.raises(ZeroShotError, match=r"exceeds the cap of 4096 bytes"):
        client(s.url, max_response_bytes=4096).chat(MESSAGES)
    assert len(s.headers) == 1
    assert client(s.url, max_response_bytes=len(big)).chat(MESSAGES) == "a" * 5000  # at the cap: accepted


def test_error_bodies_are_redacted_in_exception_and_logs(servers, caplog):
    echo = f'{{"error": "invalid key {KEY}", "got": "Authorization: Bearer {KEY}", "pad": "{"x" * 500}"}}'.encode()
    s = servers(lambda h, n: reply(500 if n == 0 else 401, echo)(h, n))
    with caplog.at_level(logging.DEBUG, logger="reasonknee3d"), pytest.raises(ZeroShotError, match="HTTP 401") as e:
        client(s.url, max_retries=2).chat(MESSAGES)
    msg = str(e.value)
    assert KEY not in msg and "invalid key ***" in msg and "Bearer ***" in msg
    assert msg.endswith("...") and len(msg) < len(s.url) + 300  # the 500-character padding is cut
    assert "HTTP 500" in caplog.text and "invalid key ***" in caplog.text  # the retry was logged, redacted
    assert KEY not in caplog.text
    assert len(s.headers) == 2  # 500 retried, 401 not


def test_retried_network_error_text_is_redacted(servers, caplog):
    junk = f"not json {KEY}".encode()
    s = servers(reply(200, junk))
    with caplog.at_level(logging.DEBUG, logger="reasonknee3d"), pytest.raises(ZeroShotError, match="not JSON") as e:
        client(s.url, max_retries=1).chat(MESSAGES)
    assert KEY not in str(e.value) and "***" in str(e.value) and KEY not in caplog.text


def test_redact_secrets():
    assert redact_secrets(f"a {KEY} b", [KEY, None, ""]) == "a *** b"
    assert redact_secrets('{"Authorization": "Bearer abc.DEF-123"}') == '{"Authorization": "Bearer ***"}'
    assert redact_secrets("bearer   tok,next") == "bearer ***,next"
    assert redact_secrets("nothing secret", [KEY]) == "nothing secret"


def test_bad_base_url_and_limits_rejected():
    with pytest.raises(ValueError, match="expected an http:// or https:// URL"):
        OpenAIChatClient(base_url="file:///etc", model="m")
    with pytest.raises(ValueError, match="max_response_bytes"):
        OpenAIChatClient(base_url="https://example.org/v1", model="m", max_response_bytes=0)


def test_missing_key_for_a_remote_endpoint_is_an_error(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match=r"OPENAI_API_KEY is not set and https://api\.example\.org/v1 is not a "
                                         r"local server.*--allow-no-key"):
        run_zeroshot("openai", "m", tmp_path, "test", tmp_path / "p.jsonl", base_url="https://api.example.org/v1",
                     env={"OPENAI_API_KEY": ""})
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    argv = ["zeroshot", "--backend", "openai", "--model", "m", "--data", str(tmp_path), "--out",
            str(tmp_path / "p.jsonl"), "--base-url", "https://api.example.org/v1"]
    assert cli.main(argv) == 2
    assert "OPENAI_API_KEY is not set" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()
    # --allow-no-key passes the check: the run gets as far as reading the (here absent) release.
    assert cli.main(argv + ["--allow-no-key"]) == 2
    err = capsys.readouterr().err
    assert "OPENAI_API_KEY" not in err and str(tmp_path) in err
