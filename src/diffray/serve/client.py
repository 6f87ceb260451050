"""HTTP client of a diffray endpoint (`diffray generate --url`): POST /v1/generate, retry with exponential
backoff on 408/429/502/503/504 and connection errors (honouring Retry-After, in seconds or as an HTTP date), save
the PNGs. A server behind a reverse proxy is given by its base URL with the proxy's path prefix
(`http://HOST/PREFIX`); every endpoint is that path plus `/v1/...` (`endpoint_url`, also for `diffray.world.judge`).

Every failure is one `RequestError` line naming the endpoint (credentials never shown), what came back and
what to do. It never follows a redirect (that would send the body's API key elsewhere), never reads more than
`MAX_ANSWER_BYTES` of an answer, and never leaves a half-written PNG. Standard library only; never imports ray
or torch.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import http.client
import json
import math
import os
import re
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any

from diffray.errors import ConfigError, DiffrayError, RequestError, hidden_credentials

RETRY_STATUS = (408, 429, 502, 503, 504)
MAX_ANSWER_BYTES = 512 * 2**20  # far above n images at the server's size limits; a stream past it is no answer
MAX_ERROR_BYTES = 64 * 2**10  # of an error body: its first line is all a message shows
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_TIMEOUT_S = 300.0  # per attempt: a generation at the server's largest size and step count fits


@dataclass
class RetryPolicy:
    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int, retry_after: str | None, now: float | None = None) -> float:
        """Seconds before retry `attempt` (0-based): Retry-After when it is seconds or an HTTP date (the time
        until it from `now`, a POSIX time; default the clock's), else exponential; within [0, max_backoff_s]."""
        wait = retry_after_s(retry_after, time.time() if now is None else now)
        if wait is None:
            wait = self.backoff_s * 2 ** attempt
        return min(max(wait, 0.0), self.max_backoff_s)


def retry_after_s(value: str | None, now: float) -> float | None:
    """A Retry-After header's seconds (RFC 9110: delay-seconds or an HTTP date, then the seconds from `now` to it,
    negative when past); None when absent or neither (the caller backs off instead)."""
    value = (value or "").strip()
    if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):  # not str.isdigit: it takes '²', which float() refuses
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # '-0000': UTC by RFC 5322, naive from parsedate_to_datetime
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp() - now


def check_server_url(url: str) -> None:
    """Raises ConfigError naming `--url` when `url` is no http(s) URL with a host and a valid port (no retry
    could reach it), carries credentials (never sent: the key goes in a header), or a query or fragment (no
    endpoint path could follow it; what follows `?` is not shown: it may hold a token)."""
    shown = hidden_credentials(url)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as exc:
        raise ConfigError(f"{shown}: {exc} (http://HOST:PORT)", field="--url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{shown}: not the http(s) URL of a diffray server (http://HOST:PORT)", field="--url")
    if "@" in parts.netloc:
        raise ConfigError(f"{shown}: credentials in the URL are not sent; give the key with --api-key or "
                          "$DIFFRAY_API_KEY", field="--url")
    if "?" in url or "#" in url:
        raise ConfigError(f"{shown.split('?')[0].split('#')[0]}: a query or fragment (?..., #...) is no part of a "
                          "server's address; give its base URL (http://HOST:PORT, or http://HOST/PREFIX behind a "
                          "proxy)", field="--url")


def endpoint_url(url: str, route: str) -> str:
    """The endpoint `route` (`/v1/generate`) of the server at base URL `url`: its path (a reverse proxy's prefix,
    `http://h/diffray/`) then `route`. Raises ConfigError naming `--url` as `check_server_url` does."""
    check_server_url(url)
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + route, "", ""))


def check_timeout(timeout: float) -> float:
    """`timeout` (seconds per attempt) when it is a finite number above 0; else ConfigError naming `--timeout`."""
    if not (isinstance(timeout, (int, float)) and 0 < timeout < math.inf):  # nan and inf compare False
        raise ConfigError(f"must be a finite number of seconds above 0, got {timeout}", field="--timeout")
    return float(timeout)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib would re-send the Authorization header to any host, as a GET without the body


_OPENER = urllib.request.build_opener(_NoRedirect)


def post_json(url: str, body: dict[str, Any], api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
              retry: RetryPolicy | None = None, on_retry=None) -> tuple[dict, dict]:
    """POST `body`, retrying transient failures. Returns (JSON answer, response headers).

    Raises:
        ConfigError: naming `--url` when `url` is no http(s) URL (no retry could reach it), `--api-key` for a
            key no header can carry, `--timeout` for a timeout that is not a finite number above 0.
        RequestError: a refusal (the server's message and field), a redirect, a TLS failure or an answer that is
            no JSON object (not retried), or retries exhausted on 408/429/5xx, timeouts and connection errors.
    """
    check_server_url(url)
    timeout = check_timeout(timeout)
    where, retry = hidden_credentials(url), retry or RetryPolicy()
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        if not (api_key.isascii() and api_key.isprintable()):
            raise ConfigError("the key has characters an HTTP header cannot carry (printable ASCII only)",
                              field="--api-key")
        headers["Authorization"] = f"Bearer {api_key}"
    last = ""
    for attempt in range(retry.attempts):
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        retry_after = None
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                return _json_object(_read_answer(resp, where), where), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            if exc.code not in RETRY_STATUS:
                raise _refusal(exc, where) from None
            message, _ = _error_message(exc)
            last, retry_after = f"HTTP {exc.code}: {message}", exc.headers.get("Retry-After")
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError):
                raise _tls_failure(reason, where) from None
            last = _connection_problem(reason, timeout)
        if attempt + 1 < retry.attempts:
            wait = retry.delay(attempt, retry_after)
            if on_retry:
                on_retry(attempt + 1, last, wait)
            time.sleep(wait)
    raise RequestError(f"{where}: gave up after {retry.attempts} attempts ({last})", status=503, kind="unavailable")


def _read_answer(resp, where: str) -> bytes:
    """The answer's body, at most MAX_ANSWER_BYTES; IncompleteRead (retried) when it stops short of its length."""
    limit = MAX_ANSWER_BYTES
    length = getattr(resp, "length", None)
    if length is not None and length > limit:
        raise _bad_answer(where, f"announces {length} bytes, more than the {limit} an image answer may have")
    data = resp.read() if length is not None else resp.read(limit + 1)
    if len(data) > limit:
        raise _bad_answer(where, f"is more than the {limit} bytes an image answer may have")
    return data


def _json_object(data: bytes, where: str) -> dict:
    try:
        answer = json.loads(data)
    except ValueError as exc:
        raise _bad_answer(where, f"is not JSON ({str(exc).split(':')[0]}: {_snippet(data)!r})") from None
    if not isinstance(answer, dict):
        raise _bad_answer(where, f"is JSON, but a {type(answer).__name__}, not an object")
    return answer


def _bad_answer(where: str, what: str) -> RequestError:
    return RequestError(f"{where}: the answer {what}; is --url a diffray server?", status=502, kind="api_error")


def _snippet(data: bytes, limit: int = 120) -> str:
    """The start of a body as one line of text: tags dropped, whitespace collapsed."""
    text = re.sub(r"<[^>]*>", " ", data[:4096].decode("utf-8", "replace"))
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _error_message(exc: urllib.error.HTTPError) -> tuple[str, str | None]:
    """(message, param) of an error answer: diffray's `{"error": {...}}`, a `{"detail": ...}`, else its text."""
    try:
        raw = exc.read(MAX_ERROR_BYTES)
    except (OSError, http.client.HTTPException):
        raw = b""
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        param = error.get("param")
        return error["message"], param if isinstance(param, str) else None
    if isinstance(payload, dict) and isinstance(payload.get("detail"), str):
        return payload["detail"], None
    return _snippet(raw) or str(exc.reason or "no message"), None


def _refusal(exc: urllib.error.HTTPError, where: str) -> RequestError:
    """A non-retried HTTP error as one line: the server's message and field, and what to do."""
    message, param = _error_message(exc)
    if 300 <= exc.code < 400:
        to = hidden_credentials(exc.headers.get("Location") or "nowhere")
        return RequestError(f"{where}: redirected (HTTP {exc.code}) to {to}, not followed; give --url the "
                            "server's own address", status=exc.code)
    hint = ""
    if exc.code in (401, 403):
        hint = "; give the key with --api-key or $DIFFRAY_API_KEY"
    elif exc.code == 404 and param is None:
        hint = "; is --url the server's root (http://HOST:PORT, without /v1)?"
    elif exc.code >= 500:
        hint = "; the server's log says why"
    return RequestError(f"{message} ({where} answered HTTP {exc.code}{hint})", param=param, status=exc.code)


def _tls_failure(reason: ssl.SSLError, where: str) -> RequestError:
    if isinstance(reason, ssl.SSLCertVerificationError):
        why = f"its certificate is not trusted ({reason.verify_message})"
    else:
        why = f"no TLS handshake ({reason.reason or reason}); for a plain-HTTP server give --url http://..."
    return RequestError(f"{where}: {why}", status=502, kind="api_error")


def _connection_problem(reason: BaseException | str, timeout: float) -> str:
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g}s"
    if isinstance(reason, http.client.IncompleteRead):
        return f"the connection closed mid-answer ({len(reason.partial)} bytes read, {reason.expected} more expected)"
    return reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"


class Spinner:
    """Elapsed seconds on stderr while a long request runs (progress for long generations), on a terminal only: in
    a log (CI, `nohup`, a Ray job) each `\r` update would be a line of its own, two a second."""

    def __init__(self, label: str):
        self.label, self.done = label, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.time()
        while not self.done.wait(0.5):
            print(f"\r{self.label}: {time.time() - t0:5.1f}s", end="", file=sys.stderr, flush=True)

    def __enter__(self):
        if sys.stderr.isatty():
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        if self.thread.ident is not None:  # started
            self.thread.join()
            print("\r", end="", file=sys.stderr, flush=True)


def generate_remote(url: str, prompts: list[str], out: Path, seed: int = 0, num_images: int = 1,
                    steps: int | None = None, guidance: float | None = None, adapter: str | Path | None = None,
                    lora_scale: float = 1.0, size: int | None = None, api_key: str | None = None,
                    retry: RetryPolicy | None = None, timeout: float | None = None) -> list[Path]:
    """One /v1/generate request per prompt; PNGs saved as `<out stem>-<prompt>-<image>.png` next to `out`.
    `timeout` bounds each attempt's wait for an answer (None: DEFAULT_TIMEOUT_S).

    Raises:
        ConfigError: `url` is no http(s) base URL (`check_server_url`), `timeout` no finite number above 0, or
            `out`'s folder cannot be written.
        RequestError: the server refused a request, answered no PNGs, or stayed unreachable through the retries.
    """
    endpoint = endpoint_url(url, "/v1/generate")
    timeout = DEFAULT_TIMEOUT_S if timeout is None else check_timeout(timeout)
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write there ({exc.strerror or exc})", field="--out") from None
    paths: list[Path] = []

    def note(attempt: int, why: str, wait: float) -> None:
        print(f"\nretry {attempt} in {wait:.1f}s ({why})", file=sys.stderr, flush=True)

    for p, prompt in enumerate(prompts):
        body: dict[str, Any] = {"prompt": prompt, "n": num_images, "seed": seed}
        if guidance is not None:  # else the server's model's default
            body["guidance"] = guidance
        if steps is not None:
            body["steps"] = steps
        if size is not None:
            body["width"] = body["height"] = size
        if adapter:
            body.update(adapter=str(adapter), adapter_scale=lora_scale)
        with Spinner(f"[{p + 1}/{len(prompts)}] generating"):
            answer, _ = post_json(endpoint, body, api_key=api_key, timeout=timeout, retry=retry, on_retry=note)
        pngs = answer_pngs(answer, hidden_credentials(endpoint))  # all checked before any is written
        for i, png in enumerate(pngs):
            paths.append(write_atomically(png, out.with_name(f"{out.stem}-{p}-{i}.png")))
        print(f"[{p + 1}/{len(prompts)}] {len(pngs)} image(s) seed {answer.get('seed')}", file=sys.stderr, flush=True)
    if not paths:
        raise DiffrayError(f"{hidden_credentials(endpoint)}: no images in the answer")
    return paths


def answer_pngs(answer: dict, where: str) -> list[bytes]:
    """The PNGs of a /v1/generate answer (`{"images": [{"b64_json": ...}]}`); RequestError naming the first
    image that is not base64 of a PNG."""
    images = answer.get("images", [])
    if not isinstance(images, list):
        raise _bad_answer(where, f"has images of type {type(images).__name__}, not a list")
    pngs = []
    for i, img in enumerate(images):
        b64 = img.get("b64_json") if isinstance(img, dict) else None
        if not isinstance(b64, str):
            raise _bad_answer(where, f"has no b64_json text in image {i}")
        try:
            png = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_answer(where, f"has image {i} that is not base64") from None
        if not png.startswith(PNG_SIGNATURE):
            raise _bad_answer(where, f"has image {i} that is not a PNG ({_snippet(png, 40)!r}...)")
        pngs.append(png)
    return pngs


def write_atomically(data: bytes, path: Path) -> Path:
    """Write through a temporary sibling renamed into place: never a half-written file at `path`; ConfigError
    (naming --out) when the disk refuses."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write ({exc.strerror or exc})", field="--out") from None
    return path
