"""An OpenAI-compatible chat-completions client that is safe with secrets (the zero-shot API runner's).

``POST {base_url}/chat/completions`` over the standard library only. The API key goes to the base URL's
host only: every redirect is refused (a redirect to another host is an error naming both hosts). One deadline
covers a whole attempt, from connect to the reply's last byte, so a server that trickles bytes still times
out; replies over a size cap are rejected; retries back off on 429 / 5xx / network errors (honouring
``Retry-After``); the key and any ``Bearer`` token are redacted from every error and log line.
"""
from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import json
import logging
import math
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger(__name__)


class ZeroShotError(RuntimeError):
    """A request that failed for good (after retries) or a response that could not be used."""


KEY_ENV = "OPENAI_API_KEY"
DEFAULT_MAX_RESPONSE_BYTES = 8 * 2 ** 20
_ERROR_DETAIL_READ = 4096   # bytes of an HTTP error body read at most
_ERROR_DETAIL_SHOWN = 200   # characters of it shown, after redaction
_BEARER = re.compile(r"(?i)\b(bearer)\s+[^\s\"',;}]+")


def redact_secrets(text: Any, secrets: Sequence[Optional[str]] = ()) -> str:
    """``text`` with every secret in ``secrets`` and every ``Bearer <token>`` replaced by ``***``.

    Used on everything the client raises or logs, since error bodies, reprs of replies and exception texts
    can echo the request's ``Authorization`` header.
    """
    out = str(text)
    for secret in secrets:
        if secret:
            out = out.replace(secret, "***")
    return _BEARER.sub(r"\1 ***", out)


def is_local_url(url: str) -> bool:
    """Whether ``url`` points at this machine (``localhost`` or a loopback address)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> tuple[str, str, int]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme, 0)
    return scheme, (parts.hostname or "").lower(), port


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _NotRetried(ZeroShotError):
    """A failure that another attempt would repeat (a refused redirect, an oversized reply)."""


class _DeadlineReader(io.RawIOBase):
    """Reads a socket while a monotonic deadline lasts: before every read the socket's timeout is set to the
    time left, so a server that trickles bytes cannot stretch a request past its overall timeout."""

    def __init__(self, sock: socket.socket, deadline: float, timeout: float) -> None:
        super().__init__()
        self._sock, self._deadline, self._timeout = sock, deadline, timeout
        self._io = sock.makefile("rb", buffering=0)  # counted as a user of the socket, like http.client's

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete reply within the request timeout of {self._timeout:g} s")
        self._sock.settimeout(left)
        try:
            return self._io.readinto(buf)
        except TimeoutError:  # the socket timeout is the time left, so this is the overall deadline
            raise TimeoutError(f"no complete reply within the request timeout of {self._timeout:g} s") from None

    def close(self) -> None:
        if not self.closed:
            self._io.close()
        super().close()


class _DeadlineSocket:
    """What ``http.client.HTTPResponse`` needs of a socket (``makefile``), reading through ``_DeadlineReader``."""

    def __init__(self, sock: socket.socket, deadline: float, timeout: float) -> None:
        self._args = (sock, deadline, timeout)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(*self._args))


class _DeadlineConnection:
    """Mixin for ``http.client`` connections: connect, send and every read share one deadline."""

    def __init__(self, *args: Any, deadline: float, overall_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        self._deadline, self._overall_timeout = deadline, overall_timeout

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete reply within the request timeout of {self._overall_timeout:g} s")
        return left

    def connect(self) -> None:
        self.timeout = self._left()
        super().connect()  # type: ignore[misc]

    def send(self, data: Any) -> None:
        if self.sock is not None:  # type: ignore[attr-defined]
            self.sock.settimeout(self._left())  # type: ignore[attr-defined]
        super().send(data)  # type: ignore[misc]

    def response_class(self, sock: socket.socket, *args: Any, **kwargs: Any) -> http.client.HTTPResponse:
        shim = _DeadlineSocket(sock, self._deadline, self._overall_timeout)
        return http.client.HTTPResponse(shim, *args, **kwargs)  # type: ignore[arg-type]


class _DeadlineHTTPConnection(_DeadlineConnection, http.client.HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnection, http.client.HTTPSConnection):
    pass


class _DeadlineHandler:
    """Mixin for urllib's HTTP(S) handlers: the connection gets the request's deadline (``req.deadline``)."""

    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        tls = isinstance(http_class, type) and issubclass(http_class, http.client.HTTPSConnection)
        cls = _DeadlineHTTPSConnection if tls else _DeadlineHTTPConnection
        conn = functools.partial(cls, deadline=req.deadline,  # type: ignore[attr-defined]
                                 overall_timeout=req.overall_timeout)  # type: ignore[attr-defined]
        return super().do_open(conn, req, **kwargs)  # type: ignore[misc]


class _DeadlineHTTPHandler(_DeadlineHandler, urllib.request.HTTPHandler):
    pass


class _DeadlineHTTPSHandler(_DeadlineHandler, urllib.request.HTTPSHandler):
    pass


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: a 3xx reply surfaces as an ``HTTPError`` and ``OpenAIChatClient`` refuses it.

    urllib would otherwise resend the request, ``Authorization`` header included, to whatever host the
    ``Location`` names. Refusing every redirect (not only cross-host ones) also keeps a POST from being
    turned into a GET without its body.
    """

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


@dataclass
class OpenAIChatClient:
    """Minimal chat-completions client (``POST {base_url}/chat/completions``) with retries.

    Safe with the API key: it goes only to ``base_url``'s host (redirects are refused, never followed) and is
    replaced by ``***`` in everything the client raises or logs (``redact_secrets``). Each attempt has one
    overall deadline (connect, send and every read of the reply) and a cap on the reply size.
    """

    base_url: str
    model: str
    api_key: Optional[str] = field(default=None, repr=False)
    timeout: float = 120.0
    """Seconds per attempt, connect to last byte of the reply, before it is abandoned (and retried)."""
    max_retries: int = 4
    """Retries after the first attempt on 429, 5xx, timeouts, network errors and malformed replies."""
    backoff: float = 1.0
    """First retry delay in seconds; doubles per retry (with jitter), capped at ``max_backoff``."""
    max_backoff: float = 60.0
    json_mode: bool = True
    """Ask for ``response_format: json_object``; dropped for good when the server rejects it (HTTP 400/422)."""
    max_tokens: Optional[int] = None
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    """Largest reply body accepted; a larger one is an error (not retried)."""
    _opener: Any = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        scheme, host, _ = _origin(self.base_url)
        if scheme not in ("http", "https") or not host:
            raise ValueError(f"base URL {self.base_url!r}: expected an http:// or https:// URL with a host")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if not self.max_response_bytes > 0:
            raise ValueError(f"max_response_bytes must be > 0, got {self.max_response_bytes}")
        if self.api_key and scheme == "http" and not is_local_url(self.base_url):
            logger.warning("%s: the API key is sent unencrypted over plain http to %s; prefer https", self.url, host)
        self._opener = urllib.request.build_opener(_NoRedirects, _DeadlineHTTPHandler, _DeadlineHTTPSHandler)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def redact(self, text: Any) -> str:
        """``text`` with this client's key and any bearer token replaced by ``***``."""
        return redact_secrets(text, [self.api_key])

    def _read_capped(self, resp: Any) -> bytes:
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_response_bytes:
            raise _NotRetried(f"{self.url}: reply of {int(declared)} bytes (Content-Length) exceeds the cap of "
                              f"{self.max_response_bytes} bytes")
        chunks, total = [], 0
        while True:
            chunk = resp.read(min(65536, self.max_response_bytes + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > self.max_response_bytes:
                raise _NotRetried(f"{self.url}: reply exceeds the cap of {self.max_response_bytes} bytes")

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        req.deadline = time.monotonic() + self.timeout  # type: ignore[attr-defined]
        req.overall_timeout = self.timeout  # type: ignore[attr-defined]
        with self._opener.open(req, timeout=self.timeout) as resp:
            raw = self._read_capped(resp)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ZeroShotError(self.redact(f"{self.url}: response is not JSON: {raw[:120]!r}")) from None

    def _content(self, data: Any, url: str) -> str:
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ZeroShotError(self.redact(f"{url}: response has no choices[0].message.content: "
                                            f"{str(data)[:160]}")) from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ZeroShotError(f"{url}: message content is {type(content).__name__}, expected text")
        return content

    def _error_detail(self, e: urllib.error.HTTPError) -> str:
        """The start of an HTTP error body, redacted, on one line, at most ``_ERROR_DETAIL_SHOWN`` characters."""
        try:
            raw = e.read(_ERROR_DETAIL_READ) if e.fp is not None else b""
        except (OSError, http.client.HTTPException, ValueError):
            raw = b""
        finally:
            e.close()
        text = " ".join(self.redact(raw.decode("utf-8", "replace")).split())
        return text if len(text) <= _ERROR_DETAIL_SHOWN else text[:_ERROR_DETAIL_SHOWN] + "..."

    def _redirect_error(self, e: urllib.error.HTTPError) -> _NotRetried:
        location = e.headers.get("Location") if e.headers else None
        if not location:
            return _NotRetried(f"{self.url}: HTTP {e.code} redirect without a Location; redirects are not followed")
        target = urllib.parse.urljoin(self.url, location)
        here, there = _origin(self.url), _origin(target)
        if here != there:
            msg = (f"{self.url}: HTTP {e.code} redirect to another host refused: from {here[0]}://{here[1]}:{here[2]} "
                   f"to {there[0]}://{there[1]}:{there[2]} ({target}); the API key is sent to the base URL's host "
                   f"only and nothing was sent to the other host. Set --base-url to the endpoint that answers")
        else:
            msg = (f"{self.url}: HTTP {e.code} redirect to {target} refused; redirects are not followed, set "
                   f"--base-url to the endpoint that answers directly")
        return _NotRetried(self.redact(msg))

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
                if 300 <= e.code < 400:
                    e.close()
                    raise self._redirect_error(e) from None
                detail = self._error_detail(e)
                if e.code in (400, 422) and self.json_mode:
                    logger.info("%s rejected response_format json_object (HTTP %d); retrying without it", self.url, e.code)
                    self.json_mode = False
                    continue  # not a retry: the request itself changes
                if e.code != 429 and not 500 <= e.code < 600:
                    raise ZeroShotError(self.redact(f"{self.url}: HTTP {e.code}: {detail}")) from None
                retry_after = _retry_after(e.headers.get("Retry-After") if e.headers else None)
                last = f"HTTP {e.code}: {detail}"
            except _NotRetried:
                raise
            except (OSError, http.client.HTTPException) as e:
                # OSError covers URLError (connect failures), TimeoutError (the deadline) and TLS / connection
                # resets while reading; a server that closes early raises IncompleteRead (http.client).
                last = self.redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            except ZeroShotError as e:
                last = str(e)
            if attempt >= self.max_retries:
                raise ZeroShotError(self.redact(f"{self.url}: failed after {attempt + 1} attempts; last error: {last}"))
            delay = self._delay(attempt, retry_after)
            logger.info("%s: %s; retry %d/%d in %.1fs", self.url, last, attempt + 1, self.max_retries, delay)
            self.sleep(delay)
            attempt += 1


