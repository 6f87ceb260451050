"""The HTTP edge without Ray: OpenAI-shaped errors, 400 naming the field, auth, body cap."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from diffray.errors import RequestError
from diffray.serve.http import EdgeMiddleware, EdgePolicy, install_error_handlers, key_ok
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


def test_key_ok_constant_time_match():
    assert key_ok("Bearer abc", ["x", "abc"]) and key_ok("bearer abc ", ["abc"]) and not key_ok("Bearer ab", ["abc"])


def test_unknown_route_json_404(client):
    r = client.get("/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
