"""`diffray generate --url` against a scripted HTTP server on 127.0.0.1 (a real socket, no Ray): it retries
408 and 503 answers and succeeds, gives up after its retry limit with one readable line, and does not retry a 4xx."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from diffray.errors import RequestError
from diffray.serve.client import RetryPolicy, post_json


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture()
def scripted():
    """A server answering POSTs from a script of statuses (the last one repeats); records each body."""
    state = {"script": [200], "bodies": []}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            state["bodies"].append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status = state["script"][min(len(state["bodies"]), len(state["script"])) - 1]
            payload = ({"images": [{"b64_json": _png()}], "seed": 3} if status == 200 else
                       {"error": {"message": f"scripted {status}", "param": "prompt" if status == 400 else None}})
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 503:
                self.send_header("Retry-After", "0")  # the client honours it: no waiting in the test
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    thread.join()


def _cli(url: str, out) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "diffray.cli", "generate", "--url", url, "-p", "a red circle",
                           "--seed", "3", "--out", str(out)], capture_output=True, text=True, timeout=120, env=env)


def test_generate_url_retries_408_and_503_then_succeeds_and_gives_up_after_its_limit(scripted, tmp_path):
    scripted["script"] = [408, 503, 200]  # a proxy timeout, then overload, then the answer
    proc = _cli(scripted["url"], tmp_path / "img.png")
    assert proc.returncode == 0, proc.stderr
    assert len(scripted["bodies"]) == 3 and proc.stderr.count("retry ") == 2, proc.stderr
    assert all(b["prompt"] == "a red circle" and b["seed"] == 3 for b in scripted["bodies"])
    assert Image.open(tmp_path / "img-0-0.png").size == (8, 8)

    scripted["script"], scripted["bodies"] = [503], []
    proc = _cli(scripted["url"], tmp_path / "never.png")
    attempts = RetryPolicy().attempts
    assert proc.returncode != 0 and len(scripted["bodies"]) == attempts
    assert f"gave up after {attempts} attempts" in proc.stderr and "HTTP 503" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("never*"))


def test_a_4xx_is_not_retried_and_names_the_field(scripted):
    scripted["script"] = [400]
    with pytest.raises(RequestError) as err:
        post_json(scripted["url"] + "/v1/generate", {"prompt": ""}, retry=RetryPolicy(attempts=5, backoff_s=0))
    assert len(scripted["bodies"]) == 1 and err.value.status == 400 and err.value.param == "prompt"


@pytest.mark.parametrize("url", ["localhost:8000", "127.0.0.1:8000", "ftp://127.0.0.1:8000", "http://"])
def test_a_url_no_server_can_answer_is_one_line_at_once_not_six_retries(url, tmp_path, monkeypatch, capsys):
    """`--url localhost:8000` (no scheme) was retried 6 times with backoff ('unknown url type') before the
    error: it names `--url` now, before any request."""
    from testkit.cli import diffray

    code, out = diffray(["generate", "--url", url, "--prompt", "a red circle", "--out", tmp_path], monkeypatch,
                        capsys)
    assert code == 2 and out == f"diffray: error: --url: {url}: not the http(s) URL of a diffray server " \
        "(http://HOST:PORT)\n", out
