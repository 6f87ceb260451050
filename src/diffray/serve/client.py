"""HTTP client of a diffray endpoint (`diffray generate --url`): POST /v1/generate, retry with exponential
backoff on 503/502/504/408 and connection errors (honouring Retry-After), save the PNGs.

Standard library only; never imports ray or torch.
"""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffray.errors import ConfigError, DiffrayError, RequestError

RETRY_STATUS = (408, 502, 503, 504)


@dataclass
class RetryPolicy:
    attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """Seconds before retry `attempt` (0-based): Retry-After when given, else exponential."""
        if retry_after and retry_after.replace(".", "", 1).isdigit():
            return min(float(retry_after), self.max_backoff_s)
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s)


def check_server_url(url: str) -> None:
    """Raises ConfigError naming `--url` when `url` is no http(s) URL with a host (no retry could reach it)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{url}: not the http(s) URL of a diffray server (http://HOST:PORT)", field="--url")


def post_json(url: str, body: dict[str, Any], api_key: str | None = None, timeout: float = 300.0,
              retry: RetryPolicy | None = None, on_retry=None) -> tuple[dict, dict]:
    """POST `body`, retrying transient failures. Returns (JSON answer, response headers).

    Raises:
        ConfigError: naming `--url` when `url` is no http(s) URL (no retry could reach it).
        RequestError: a 4xx (the server's message and field), or retries exhausted on 5xx/connection errors.
    """
    check_server_url(url)
    retry = retry or RetryPolicy()
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    last = ""
    for attempt in range(retry.attempts):
        req = urllib.request.Request(url, data=data, headers=headers, method="POST")
        retry_after = None
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read()), dict(resp.headers)
        except urllib.error.HTTPError as exc:
            payload = _error_payload(exc)
            if exc.code not in RETRY_STATUS:
                raise RequestError(payload.get("message", f"HTTP {exc.code}"), param=payload.get("param"),
                                   status=exc.code) from None
            last, retry_after = f"HTTP {exc.code}: {payload.get('message', '')}", exc.headers.get("Retry-After")
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        if attempt + 1 < retry.attempts:
            wait = retry.delay(attempt, retry_after)
            if on_retry:
                on_retry(attempt + 1, last, wait)
            time.sleep(wait)
    raise RequestError(f"{url}: gave up after {retry.attempts} attempts ({last})", status=503, kind="unavailable")


def _error_payload(exc: urllib.error.HTTPError) -> dict:
    try:
        return json.loads(exc.read()).get("error") or {}
    except (ValueError, AttributeError, OSError):
        return {}


class Spinner:
    """Elapsed seconds on stderr while a long request runs (progress for long generations)."""

    def __init__(self, label: str):
        self.label, self.done = label, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.time()
        while not self.done.wait(0.5):
            print(f"\r{self.label}: {time.time() - t0:5.1f}s", end="", file=sys.stderr, flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        print("\r", end="", file=sys.stderr, flush=True)


def generate_remote(url: str, prompts: list[str], out: Path, seed: int = 0, num_images: int = 1,
                    steps: int | None = None, guidance: float | None = None, adapter: str | None = None,
                    lora_scale: float = 1.0, size: int | None = None, api_key: str | None = None,
                    retry: RetryPolicy | None = None) -> list[Path]:
    """One /v1/generate request per prompt; PNGs saved as `<out stem>-<prompt>-<image>.png` next to `out`.

    Raises:
        ConfigError: `url` is no http(s) URL (`check_server_url`).
        RequestError: the server refused a request, or it stayed unreachable through the retries.
    """
    check_server_url(url)
    endpoint = url.rstrip("/") + "/v1/generate"
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
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
            body.update(adapter=adapter, adapter_scale=lora_scale)
        with Spinner(f"[{p + 1}/{len(prompts)}] generating"):
            answer, _ = post_json(endpoint, body, api_key=api_key, retry=retry, on_retry=note)
        for i, img in enumerate(answer.get("images", [])):
            path = out.with_name(f"{out.stem}-{p}-{i}.png")
            path.write_bytes(base64.b64decode(img["b64_json"]))
            paths.append(path)
        print(f"[{p + 1}/{len(prompts)}] {len(answer.get('images', []))} image(s) seed {answer.get('seed')}",
              file=sys.stderr, flush=True)
    if not paths:
        raise DiffrayError(f"{endpoint}: no images in the answer")
    return paths
