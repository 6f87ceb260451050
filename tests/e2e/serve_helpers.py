"""Helpers shared by the serving e2e modules: a free port, an HTTP client of the API that returns
(status, JSON, lower-cased headers) for any answer, image codecs, and starting a diffray app on the
session's local Ray cluster."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from testkit.net import free_port  # noqa: F401  (re-exported for the serve tests)

KEY = "test-key-123"


class Server:
    def __init__(self, url: str, registry: Path):
        self.url, self.registry = url, registry

    def call(self, method: str, path: str, body=None, raw: bytes | None = None, key: str | None = KEY,
             headers: dict | None = None, timeout: float = 120) -> tuple[int, dict, dict]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        h = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=data, headers=h, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                payload = r.read()
                return r.status, (json.loads(payload) if r.headers.get_content_type() == "application/json"
                                  else {"text": payload.decode(errors="replace")}), lower(r.headers)
        except urllib.error.HTTPError as e:
            payload = e.read()
            try:
                parsed = json.loads(payload)
            except ValueError:
                parsed = {"text": payload.decode(errors="replace")}
            return e.code, parsed, lower(e.headers)

    def generate(self, **body) -> tuple[list[np.ndarray], dict]:
        status, js, headers = self.call("POST", "/v1/generate", {"steps": 4, "seed": 7, **body})
        assert status == 200, js
        return [png_array(i["b64_json"]) for i in js["images"]], headers


def server_timing(header: str) -> dict[str, float]:
    """{name: ms} of a Server-Timing header (`name;dur=12.3, ...`)."""
    out = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        out[name] = float(dur)
    return out


def lower(headers) -> dict:
    return {k.lower(): v for k, v in headers.items()}


def png_array(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def b64_png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def control_disc() -> Image.Image:
    arr = np.zeros((64, 64, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:64, :64]
    arr[(yy - 32) ** 2 + (xx - 32) ** 2 < 18 ** 2] = (220, 40, 40)
    return Image.fromarray(arr)


def adapter_registry(model_path: str, registry: Path, controlnet: bool = True) -> Path:
    """The serving tests' registry, made without training: LoRAs `lora-a` and `lora-b` (random B), a
    Textual Inversion `ti-x` (token `<x-tok>`) and, with `controlnet`, a ControlNet `cn-x` from the UNet."""
    from testkit.adapters import controlnet_from_unet, random_lora, random_textual_inversion

    random_lora(model_path, registry / "lora-a", seed=1)
    random_lora(model_path, registry / "lora-b", seed=2)
    random_textual_inversion(model_path, registry / "ti-x", "<x-tok>", seed=3)
    if controlnet:
        controlnet_from_unet(model_path, registry / "cn-x", seed=4)
    return registry


def app_args(registry: Path, feedback_db: Path, **overrides) -> dict:
    """Args of a small test app: tiny model at 64 px, auth on, one Generator replica; `overrides` replace
    whole sections (limits=..., generator=...)."""
    args = {"model": "builtin:tiny-random", "adapters_dir": str(registry), "default_steps": 2,
            "controlnets": {"canny": {"path": "builtin:tiny-random", "subfolder": "controlnet"}},
            "limits": {"max_side": 128, "max_n": 2, "max_steps": 8, "max_body_bytes": 300_000,
                       "request_timeout_s": 120},
            "auth": {"api_keys": [KEY]},
            "generator": {"num_replicas": 1, "num_cpus": 0.5, "torch_threads": 1, "max_ongoing_requests": 8,
                          "max_queued_requests": 64, "max_adapters_per_replica": 3},
            "batching": {"enabled": True, "max_batch_size": 4, "batch_wait_timeout_s": 0.05},
            "ingress": {"num_cpus": 0.25}, "feedback": {"path": str(feedback_db)}}
    args.update(overrides)
    return args


def serve_feedback_app(name: str, registry: Path, **overrides):
    """Generator for a module fixture: a diffray app `name` on a free port of the session's Ray cluster,
    feedback stored beside `registry` (`server.db`); deleted with Serve when the generator is closed."""
    from ray import serve

    from diffray.serve.app import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(registry, registry.parent / "feedback.db", **overrides)), name=name, route_prefix="/")
    server = Server(f"http://127.0.0.1:{port}", registry)
    server.db = registry.parent / "feedback.db"
    yield server
    serve.delete(name)
    serve.shutdown()
