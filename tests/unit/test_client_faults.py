"""The remote client (`diffray generate --url`, `diffray.serve.client`) against real local servers that answer
badly: every failure is one line naming the endpoint (never its credentials), what came back and what to do;
only 408/429/5xx-like answers and dropped connections are retried; no redirect is followed; no answer is read
past its cap; no PNG file is written unless every image of the answer is one; each attempt waits `--timeout`
seconds at most; a Retry-After date is honoured; a base URL's path prefix is kept and a query refused."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from diffray.errors import ConfigError, RequestError
from diffray.serve import client
from diffray.serve.client import RetryPolicy, check_server_url, generate_remote, post_json
from diffray.world.judge import judge_endpoint

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
    ("http://127.0.0.1:8000/?key=pa55word", "http://127.0.0.1:8000/: a query or fragment (?..., #...) is no part"),
    ("http://127.0.0.1:8000/diffray#pa55word", "http://127.0.0.1:8000/diffray: a query or fragment"),
    ("http://127.0.0.1:8000?", "http://127.0.0.1:8000: a query or fragment"),
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


@pytest.fixture()
def silent():
    """A listener the kernel completes connections for; nobody ever reads or answers (a hung server)."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


def test_timeout_bounds_each_attempt_of_generate_url_and_of_the_judge(silent, tmp_path):
    """A hung server was waited on 300 s per attempt, 6 attempts, whatever the user wanted: `--timeout` (and
    the judge's `timeout`) now bounds each attempt."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "diffray.cli", "generate", "--url", silent, "--timeout", "0.2",
                             "-p", "a red circle", "--out", str(tmp_path / "x.png")], stderr=subprocess.PIPE,
                            text=True, env=env)
    said = []
    try:
        for line in proc.stderr:  # until the first retry (or the end of a process that refused --timeout)
            said.append(line.rstrip("\n"))
            if line.startswith("retry "):
                break
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert "retry 1 in 0.5s (no answer within 0.2s)" in said, said
    one_try = RetryPolicy(attempts=1)
    with pytest.raises(RequestError) as err:
        generate_remote(silent, ["a red circle"], tmp_path / "x.png", retry=one_try, timeout=0.2)
    assert str(err.value) == f"{silent}/v1/generate: gave up after 1 attempts (no answer within 0.2s)"
    with pytest.raises(RequestError) as err:
        judge_endpoint(silent, "base", "base", num=1, workers=1, timeout=0.2, retry=one_try)
    assert str(err.value) == f"{silent}/v1/generate: gave up after 1 attempts (no answer within 0.2s)"
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_timeout_that_is_not_a_finite_number_above_0_is_one_line_before_any_request(server, value, tmp_path,
                                                                                       monkeypatch, capsys):
    from testkit.cli import diffray

    said = f"diffray: error: --timeout: must be a finite number of seconds above 0, got {float(value)}\n"
    for args in (["generate", "-p", "a red circle", "--out", tmp_path / "x.png"], ["feedback", "simulate", "--right",
                                                                                 "base", "--num", "1"]):
        code, out = diffray([*args, "--url", server.url, f"--timeout={value}"], monkeypatch, capsys)
        assert (code, out) == (2, said)
    assert server.requests == [] and not list(tmp_path.iterdir())


def test_timeout_is_refused_without_url(tmp_path, monkeypatch, capsys):
    from testkit.cli import diffray

    code, out = diffray(["generate", "-p", "a red circle", "--timeout", "5", "--out", tmp_path / "x.png"],
                        monkeypatch, capsys)
    assert (code, out) == (2, "diffray: error: --timeout: only with --url (a local grid waits for no server)\n")


def test_retry_after_as_an_http_date_waits_until_then_clamped_and_garbage_backs_off():
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=8.0)
    now = datetime(2026, 10, 21, 7, 27, 57, tzinfo=timezone.utc).timestamp()
    assert policy.delay(0, "Wed, 21 Oct 2026 07:28:00 GMT", now) == 3.0
    assert policy.delay(0, "Wed, 21 Oct 2026 07:28:00 +0000", now) == 3.0
    assert policy.delay(0, "Wed, 21 Oct 2026 07:29:00 GMT", now) == 8.0  # clamped to max_backoff_s
    assert policy.delay(0, "Wed, 21 Oct 2026 07:27:00 GMT", now) == 0.0  # already past
    assert policy.delay(0, "5", now) == 5.0 and policy.delay(0, "120", now) == 8.0
    for garbage in ("soon", "Wed, 32 Oct 2026 07:28:00 GMT", "", "\u00b2", "-3", "1e3", None):
        assert policy.delay(2, garbage, now) == 2.0, garbage  # the exponential backoff: 0.5 * 2**2


def test_a_503_with_a_retry_after_date_is_retried_when_the_server_said(server):
    """Against a real server: a past date is retried at once, a far one waits max_backoff_s, garbage backs off
    (it fell back to the backoff for every date)."""
    def busy(retry_after: str):
        return answer(503, {"error": {"message": "busy"}}, headers=[("Retry-After", retry_after)])

    server.script = [busy("Wed, 21 Oct 2015 07:28:00 GMT"), busy("Fri, 01 Jan 2100 00:00:00 GMT"), busy("soon"),
                     IMAGE]
    waits = []
    answered, _ = post_json(server.url + "/v1/generate", {}, retry=RetryPolicy(attempts=4, backoff_s=0.001,
                            max_backoff_s=0.01), on_retry=lambda attempt, why, wait: waits.append(wait))
    assert len(server.requests) == 4 and answered["seed"] == 3
    assert waits == pytest.approx([0.0, 0.01, 0.004]), waits


def test_a_base_url_with_a_path_prefix_reaches_its_endpoints_for_generate_and_the_judge(server, tmp_path):
    """Behind a reverse proxy (`http://HOST/PREFIX/`): every endpoint is the prefix then /v1/..., built by one
    helper for `generate --url` and `feedback simulate`."""
    from diffray.serve.client import endpoint_url

    assert endpoint_url("http://h:8000", "/v1/generate") == "http://h:8000/v1/generate"
    assert endpoint_url("https://h/diffray/", "/v1/feedback") == "https://h/diffray/v1/feedback"
    for base in ("/diffray/", "/diffray"):
        server.script, server.requests = [IMAGE], []
        _generate(server.url + base, tmp_path / "x.png")
        assert [r[1] for r in server.requests] == ["/diffray/v1/generate"]
    server.script, server.requests = [IMAGE, IMAGE, answer(200, {"stored": True})], []
    tallies = judge_endpoint(server.url + "/diffray/", "base", "base", num=1, workers=1, retry=NO_WAIT)
    assert [r[1] for r in server.requests] == ["/diffray/v1/generate"] * 2 + ["/diffray/v1/feedback"]
    assert tallies["pairs"] == 1


def test_a_query_on_the_url_is_refused_before_any_request_by_generate_and_the_judge(server, tmp_path, monkeypatch,
                                                                                   capsys):
    """`http://h:8000/?x=1` became `http://h:8000/?x=1/v1/generate`: a request to the root with a query."""
    from testkit.cli import diffray

    url = server.url + "/?x=1"
    said = (f"--url: {server.url}/: a query or fragment (?..., #...) is no part of a server's address; give its "
            "base URL (http://HOST:PORT, or http://HOST/PREFIX behind a proxy)")
    for call in (lambda: _generate(url, tmp_path / "x.png"),
                 lambda: judge_endpoint(url, "base", "base", num=1, workers=1, retry=NO_WAIT)):
        with pytest.raises(ConfigError) as err:
            call()
        assert str(err.value) == said
    code, out = diffray(["generate", "--url", url, "-p", "a red circle", "--out", tmp_path / "x.png"], monkeypatch,
                        capsys)
    assert (code, out) == (2, f"diffray: error: {said}\n")
    assert server.requests == [] and not list(tmp_path.iterdir())
