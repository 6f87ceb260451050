"""The remote client (`diffray generate --url`, `diffray.serve.client`) against real local servers that answer
badly: every failure is one line naming the endpoint (never its credentials), what came back and what to do;
only 408/429/5xx-like answers and dropped connections are retried; no redirect is followed; no answer is read
past its cap; no PNG file is written unless every image of the answer is one."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from diffray.errors import ConfigError, RequestError
from diffray.serve import client
from diffray.serve.client import RetryPolicy, check_server_url, generate_remote, post_json

NO_WAIT = RetryPolicy(attempts=3, backoff_s=0.0)


def _png_b64() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def answer(status: int, body: bytes | dict | list, ctype: str = "application/json", headers=()):
    """A scripted answer: `status` with `body` (JSON-encoded unless bytes) and `headers`."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()

    def send(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
    return send


def cut_short(h: BaseHTTPRequestHandler) -> None:
    """Announces 1000 bytes, sends 12, closes the connection."""
    h.send_response(200)
    h.send_header("Content-Length", "1000")
    h.end_headers()
    h.wfile.write(b'{"images": [')
    h.wfile.flush()
    h.connection.shutdown(socket.SHUT_RDWR)
    h.close_connection = True


IMAGE = answer(200, {"images": [{"b64_json": _png_b64()}], "seed": 3})


class Server:
    """A real HTTP server on 127.0.0.1 answering each request with the next of `script` (the last repeats)."""

    def __init__(self):
        self.script, self.requests = [IMAGE], []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests.append((self.command, self.path, self.headers.get("Authorization")))
                server.script[min(len(server.requests), len(server.script)) - 1](self)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture()
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture()
def other():
    s = Server()
    yield s
    s.close()


def _generate(url: str, out, **kw):
    return generate_remote(url, ["a red circle"], out, retry=NO_WAIT, **kw)


def test_a_500_with_an_html_page_is_one_line_naming_the_url_and_its_text_not_retried(server, tmp_path):
    server.script = [answer(500, b"<html><body><h1>Internal Server Error</h1></body></html>", "text/html")]
    with pytest.raises(RequestError) as err:
        _generate(server.url, tmp_path / "x.png")
    msg = str(err.value)
    assert len(server.requests) == 1 and err.value.status == 500
    assert f"{server.url}/v1/generate answered HTTP 500" in msg and "Internal Server Error" in msg, msg
    assert "<" not in msg and "\n" not in msg and "log" in msg and not list(tmp_path.iterdir())


def test_a_429_is_retried_honouring_retry_after_then_succeeds(server, tmp_path):
    server.script = [answer(429, {"error": {"message": "slow down"}}, headers=[("Retry-After", "0")]), IMAGE]
    paths = _generate(server.url, tmp_path / "x.png")
    assert len(server.requests) == 2 and [p.name for p in paths] == ["x-0-0.png"]


def test_a_422_with_diffrays_error_names_the_field_the_message_and_the_url(server, tmp_path):
    server.script = [answer(422, {"error": {"message": "unknown adapter 'x'", "type": "invalid_request_error",
                                            "param": "adapter", "code": None}})]
    with pytest.raises(RequestError) as err:
        _generate(server.url, tmp_path / "x.png", adapter="x")
    assert err.value.param == "adapter" and err.value.status == 422 and len(server.requests) == 1
    assert str(err.value) == f"adapter: unknown adapter 'x' ({server.url}/v1/generate answered HTTP 422)"


def test_an_error_json_of_another_shape_is_shown_as_text(server, tmp_path):
    server.script = [answer(400, {"error": "boom"})]
    with pytest.raises(RequestError) as err:
        _generate(server.url, tmp_path / "x.png")
    assert "boom" in str(err.value) and "HTTP 400" in str(err.value) and err.value.param is None


@pytest.mark.parametrize("body, what", [
    (b"hello", "is not JSON"),
    (b'{"images": [{"b64_j', "is not JSON"),
    (b"[1, 2]", "a list, not an object"),
    (b'{"images": "abc"}', "not a list"),
    (b'{"images": ["abc"]}', "no b64_json text in image 0"),
    (b'{"images": [{"b64_json": "!!!notbase64"}]}', "image 0 that is not base64"),
    (json.dumps({"images": [{"b64_json": _png_b64()}, {"b64_json": base64.b64encode(b"hello").decode()}]}).encode(),
     "image 1 that is not a PNG"),
])
def test_an_answer_that_is_not_a_diffray_image_answer_is_one_line_and_writes_nothing(server, tmp_path, body, what):
    server.script = [answer(200, body)]
    with pytest.raises(RequestError) as err:
        _generate(server.url, tmp_path / "x.png")
    msg = str(err.value)
    assert msg.startswith(f"{server.url}/v1/generate: the answer ") and what in msg, msg
    assert msg.endswith("is --url a diffray server?") and len(server.requests) == 1
    assert not list(tmp_path.iterdir())  # the first image was fine: it is not written either


def test_an_answer_past_the_cap_is_refused_whether_announced_or_streamed(server, tmp_path, monkeypatch):
    monkeypatch.setattr(client, "MAX_ANSWER_BYTES", 2**20, raising=False)
    huge = json.dumps({"images": [{"b64_json": "A" * 2**21}]}).encode()

    def streamed(h: BaseHTTPRequestHandler) -> None:  # no Content-Length: read until the server closes
        h.send_response(200)
        h.end_headers()
        h.wfile.write(huge)
        h.close_connection = True

    for script, said in (([answer(200, huge)], "announces"), ([streamed], "is more than")):
        server.script, server.requests = script, []
        with pytest.raises(RequestError) as err:
            post_json(server.url + "/v1/generate", {}, retry=NO_WAIT)
        assert said in str(err.value) and str(2**20) in str(err.value) and len(server.requests) == 1, str(err.value)


def test_a_server_that_accepts_and_never_answers_times_out_naming_the_timeout():
    listener = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody ever reads or answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1/generate"
        with pytest.raises(RequestError) as err:
            post_json(url, {}, timeout=0.2, retry=RetryPolicy(attempts=2, backoff_s=0.0))
    finally:
        listener.close()
    assert str(err.value) == f"{url}: gave up after 2 attempts (no answer within 0.2s)"


def test_a_connection_closed_mid_answer_is_retried(server, tmp_path):
    server.script = [cut_short, IMAGE]
    notes = []
    paths = generate_remote(server.url, ["a red circle"], tmp_path / "x.png", retry=NO_WAIT)
    assert len(server.requests) == 2 and [p.name for p in paths] == ["x-0-0.png"]
    server.script, server.requests = [cut_short], []
    with pytest.raises(RequestError) as err:
        post_json(server.url + "/v1/generate", {}, retry=NO_WAIT, on_retry=lambda *a: notes.append(a))
    assert len(server.requests) == 3 and len(notes) == 2
    assert "closed mid-answer (12 bytes read, 988 more expected)" in str(err.value), str(err.value)


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_a_redirect_is_not_followed_and_the_key_never_reaches_the_other_host(server, other, tmp_path, code):
    server.script = [answer(code, b"", headers=[("Location", other.url + "/v1/generate")])]
    with pytest.raises(RequestError) as err:
        _generate(server.url, tmp_path / "x.png", api_key="sekret")
    assert other.requests == [] and server.requests == [("POST", "/v1/generate", "Bearer sekret")]
    assert str(err.value) == (f"{server.url}/v1/generate: redirected (HTTP {code}) to {other.url}/v1/generate, not "
                              "followed; give --url the server's own address")


def test_https_to_a_plain_http_port_fails_at_once_saying_so(server, tmp_path):
    notes = []
    url = server.url.replace("http://", "https://") + "/v1/generate"
    with pytest.raises(RequestError) as err:
        post_json(url, {}, retry=NO_WAIT, on_retry=lambda *a: notes.append(a))
    assert notes == [] and str(err.value).startswith(f"{url}: no TLS handshake")
    assert "give --url http://" in str(err.value)


@pytest.mark.parametrize("url, said", [
    ("http://user:pa55word@127.0.0.1:8000", "http://***@127.0.0.1:8000: credentials in the URL are not sent"),
    ("ftp://user:pa55word@127.0.0.1:8000", "ftp://***@127.0.0.1:8000: not the http(s) URL"),
    ("http://127.0.0.1:99999", "http://127.0.0.1:99999: Port out of range"),
    ("http://127.0.0.1:port", "http://127.0.0.1:port: Port could not be cast"),
    ("http://[::1", "http://[::1: Invalid IPv6 URL"),
    ("http://:8000", "http://:8000: not the http(s) URL"),
])
def test_a_url_that_cannot_work_is_refused_before_any_request_without_its_password(url, said):
    with pytest.raises(ConfigError) as err:
        check_server_url(url)
    assert str(err.value).startswith(f"--url: {said}") and "pa55word" not in str(err.value), str(err.value)


def test_a_path_in_the_url_that_doubles_v1_says_to_give_the_servers_root(server, tmp_path):
    server.script = [answer(404, {"detail": "Not Found"})]
    with pytest.raises(RequestError) as err:
        _generate(server.url + "/v1", tmp_path / "x.png")
    assert server.requests[0][1] == "/v1/v1/generate" and len(server.requests) == 1
    assert str(err.value) == (f"Not Found ({server.url}/v1/v1/generate answered HTTP 404; is --url the server's "
                              "root (http://HOST:PORT, without /v1)?)")


def test_an_api_key_no_header_can_carry_is_refused_naming_the_option_not_the_key(server):
    with pytest.raises(ConfigError) as err:
        post_json(server.url + "/v1/generate", {}, api_key="clé-secrète", retry=NO_WAIT)
    assert str(err.value).startswith("--api-key: ") and "secr" not in str(err.value) and server.requests == []


def test_the_cli_prints_one_line_without_a_traceback(server, tmp_path, monkeypatch, capsys):
    from testkit.cli import diffray

    server.script = [answer(200, b"<html>proxy login</html>", "text/html")]
    code, out = diffray(["generate", "--url", server.url, "-p", "a red circle", "--out", tmp_path / "x.png"],
                        monkeypatch, capsys)
    line = out.strip().splitlines()[-1]
    assert code == 1 and "Traceback" not in out and not list(tmp_path.iterdir()), out
    assert line == (f"diffray: error: {server.url}/v1/generate: the answer is not JSON (Expecting value: "
                    "'proxy login'); is --url a diffray server?"), out


def test_credentials_are_hidden_in_a_url_and_in_a_message_naming_urls():
    """One helper for the client and `diffray submit`: a URL's own userinfo (spaces and '@' included), and each
    URL's in a message, never its path or what follows."""
    from diffray.errors import hidden_credentials

    assert hidden_credentials("http://us er:p w@h:1/v1") == "http://***@h:1/v1"
    assert hidden_credentials("https://me:p@ss@host/") == "https://***@host/"
    assert hidden_credentials("at http://a:b@h (see x@y), then ray://t0k@h2:1") == \
        "at http://***@h (see x@y), then ray://***@h2:1"
    assert hidden_credentials("http://host:8265/a@b") == "http://host:8265/a@b"


def test_the_spinner_writes_nothing_into_a_log(capsys):
    """Not a terminal (CI, nohup, a Ray job's log): its `\\r` updates, two a second, each became a line of the log."""
    from diffray.serve.client import Spinner

    with Spinner("[1/1] generating") as spinner:
        assert not spinner.thread.is_alive()
    assert capsys.readouterr().err == ""
