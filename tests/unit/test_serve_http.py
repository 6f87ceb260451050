"""The HTTP edge without Ray: OpenAI-shaped errors, 400 naming the field, auth, body cap."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from diffray.errors import RequestError
from diffray.serve.http import EdgeMiddleware, EdgePolicy, install_error_handlers, key_ok, public_message
from diffray.serve.schemas import GenerateRequest


@pytest.fixture()
def client():
    app = FastAPI()
    app.add_middleware(EdgeMiddleware, policy=EdgePolicy(api_keys=["k"], max_body_bytes=2000))
    install_error_handlers(app)

    @app.post("/v1/generate")
    async def gen(req: GenerateRequest):
        if req.prompt == "boom":
            raise RequestError("nope", param="adapter", status=404, kind="not_found_error")
        return {"ok": req.prompt}

    @app.get("/healthz")
    async def health():
        return {"status": "ok"}

    @app.get("/admin/secret")
    async def secret():
        return {"secret": 1}

    @app.get("/leak")
    async def leak():
        raise RequestError("cannot load /srv/models/x/w.safetensors: {'<a>': tensor([[0.1, 0.2]])} "
                           "in <_io.BytesIO object at 0x7fa5dcefb6f0>", param="model", status=422)

    return TestClient(app, raise_server_exceptions=False)


AUTH = {"Authorization": "Bearer k"}


def test_ok_and_health_needs_no_key(client):
    assert client.post("/v1/generate", json={"prompt": "x"}, headers=AUTH).json() == {"ok": "x"}
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("body,param", [({"prompt": 3}, "prompt"), ({"prompt": "x", "steps": "a"}, "steps"),
                                        ({"prompt": "x", "bogus": 1}, "bogus"), ({}, "prompt"),
                                        ({"prompt": "x", "control": {"model": "c", "scale": "hi"}}, "control.scale"),
                                        ({"prompt": "x", "adapters": [{"weight": 1}]}, "adapters.0.id")])
def test_validation_errors_are_400_naming_the_field(client, body, param):
    r = client.post("/v1/generate", json=body, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_malformed_json_and_request_error(client):
    r = client.post("/v1/generate", content=b'{"prompt": ', headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body" and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/generate", json={"prompt": "boom"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"] == {"message": "nope", "type": "not_found_error",
                                                          "param": "adapter", "code": None}


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic k", "Bearer ", "k"])
def test_auth(client, header):
    r = client.post("/v1/generate", json={"prompt": "x"}, headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.json()["error"]["param"] == "authorization"


def test_body_cap_declared_and_streamed(client):
    r = client.post("/v1/generate", json={"prompt": "x" * 5000}, headers=AUTH)
    assert r.status_code == 413 and r.json()["error"]["param"] == "body"

    def chunks():
        for _ in range(5):
            yield b"x" * 1000

    r = client.post("/v1/generate", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413


def test_a_path_with_its_own_body_cap_is_held_to_it_and_the_others_to_the_default():
    """A feedback post carries two images, more than a generation request: its path has its own cap (larger, or
    smaller), counted on the streamed body too; every other path keeps max_body_bytes."""
    from diffray.serve.config import FeedbackSection, Limits

    app = FastAPI()
    cap = FeedbackSection(max_image_bytes=3000).max_body_bytes(Limits(max_body_bytes=2000))
    assert cap == 2 * (4000 + 4) + 65536
    app.add_middleware(EdgeMiddleware, policy=EdgePolicy(api_keys=["k"], max_body_bytes=2000,
                                                         body_bytes_by_path={"/v1/feedback": cap}))
    install_error_handlers(app)

    @app.post("/v1/feedback")
    @app.post("/v1/generate")
    async def size(req: dict):
        return {"size": len(req["x"])}

    c = TestClient(app, raise_server_exceptions=False)
    assert c.post("/v1/feedback", json={"x": "y" * 9000}, headers=AUTH).json() == {"size": 9000}
    r = c.post("/v1/generate", json={"x": "y" * 9000}, headers=AUTH)
    assert r.status_code == 413 and "the limit of 2000" in r.json()["error"]["message"]
    r = c.post("/v1/feedback", content=(b"y" * 1000 for _ in range(cap // 1000 + 1)),
               headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and f"the limit of {cap}" in r.json()["error"]["message"]


@pytest.mark.parametrize("method, headers, body_read", [
    ("GET", [], False), ("GET", [(b"content-length", b"0")], False),
    ("POST", [(b"content-length", b"2")], True), ("POST", [(b"transfer-encoding", b"chunked")], True)])
def test_a_request_without_a_body_never_asks_the_server_for_one(method, headers, body_read):
    """Under Serve each receive() in the replica is an actor call back to the proxy: a bodiless request skips it."""
    import asyncio

    from fastapi.responses import JSONResponse

    reads = []
    app = EdgeMiddleware(JSONResponse({"ok": True}), EdgePolicy(max_body_bytes=2000))

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"{}" if body_read else b"", "more_body": False}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/healthz", "root_path": "", "headers": headers,
             "query_string": b""}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200 and bool(reads) is body_read


def test_key_ok_constant_time_match():
    assert key_ok("Bearer abc", ["x", "abc"]) and key_ok("bearer abc ", ["abc"]) and not key_ok("Bearer ab", ["abc"])


def test_unknown_route_json_404(client):
    r = client.get("/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_duplicate_authorization_headers_are_refused(client):
    for headers in ([("Authorization", "Bearer k"), ("Authorization", "Bearer nope")],
                    [("Authorization", "Bearer nope"), ("Authorization", "Bearer k")],
                    [("Authorization", "Bearer k"), ("Authorization", "Bearer k")]):
        r = client.post("/v1/generate", content=b'{"prompt": "x"}',
                        headers=[*headers, ("Content-Type", "application/json")])
        assert r.status_code == 400 and r.json()["error"]["param"] == "authorization", headers


def test_duplicate_content_type_is_refused(client):
    r = client.post("/v1/generate", content=b'{"prompt": "x"}',
                    headers=[("Authorization", "Bearer k"), ("Content-Type", "application/json"),
                             ("Content-Type", "text/plain")])
    assert r.status_code == 400 and r.json()["error"]["param"] == "content-type"


@pytest.mark.parametrize("path", ["/admin/secret", "/v1/generate", "//v1/generate", "/V1/generate", "/nothing"])
def test_auth_is_default_deny(client, path):
    """Every path but the public few needs the key, whatever its prefix (an app mounted under another
    route prefix once skipped auth because its paths did not start with /v1/)."""
    assert client.get(path).status_code == 401


def test_public_paths_need_no_key(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_mounted_under_a_prefix_still_needs_the_key():
    outer = FastAPI()
    inner = FastAPI()
    inner.add_middleware(EdgeMiddleware, policy=EdgePolicy(api_keys=["k"]))

    @inner.get("/v1/models")
    async def models():
        return {"data": []}

    @inner.get("/healthz")
    async def health():
        return {"status": "ok"}

    outer.mount("/api", inner)
    c = TestClient(outer)
    assert c.get("/api/v1/models").status_code == 401
    assert c.get("/api/v1/models", headers=AUTH).status_code == 200
    assert c.get("/api/healthz").status_code == 200


def test_client_facing_errors_carry_no_paths_reprs_or_tensors(client):
    msg = client.get("/leak", headers=AUTH).json()["error"]["message"]
    assert "/srv" not in msg and "tensor(" not in msg and "0x" not in msg and "BytesIO" not in msg
    assert "cannot load" in msg


@pytest.mark.parametrize("text,gone", [
    ("at /home/user/.cache/diffray/models/tiny-seed0/unet: boom", "/home"),
    ("C:\\Users\\me\\a.safetensors broke", "Users"),
    ("<diffusers.pipelines.Foo object at 0xdeadbeef12>", "0xdead"),
    ("tensor([[1., 2.],\n [3., 4.]], dtype=torch.float16)", "3., 4."),
    ("x" * 5000, "x" * 401),
])
def test_public_message_scrubs(text, gone):
    out = public_message(text)
    assert gone not in out and len(out) <= 400


def test_public_message_keeps_api_paths_and_limits():
    text = "unknown adapter 'a' (GET /v1/models lists them); 64 must be a multiple of 8 in [8, 256]"
    assert public_message(text) == text


@pytest.mark.parametrize("depth", [900, 200_000])  # under and over the body cap
def test_absurdly_nested_json_is_400_not_500(client, depth):
    body = b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"
    r = client.post("/v1/generate", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code in (400, 413) and r.json()["error"]["param"] in ("body", "prompt")
