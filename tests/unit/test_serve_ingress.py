"""The real Ingress routes (`deployments.api`) in a TestClient, without Ray: the replica context is faked and
the pipeline side is a stub that records the jobs it is given. What the Ingress decides before a job reaches a
replica: the default size against the limits at start, `model: ""` refused like `adapter: ""`, ids that name
the base model never listed as adapters, and the playground page working under a route prefix."""

from __future__ import annotations

import re
import types
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
from fastapi.testclient import TestClient
from ray import serve
from safetensors.numpy import save as st_save

import diffray.serve.deployments as D
from diffray.errors import ConfigError
from diffray.serve.config import parse_args
from diffray.serve.remote_registry import open_registry

LORA = "pytorch_lora_weights.safetensors"


class StubDrawing:
    """The pipeline side: records (job, adapter key) and answers one fake PNG per image."""

    def __init__(self):
        self.jobs = []

    async def generate(self, job, key):
        self.jobs.append((job, key))
        return {"images": [b"PNG"] * job.n, "replica": "r1", "resident": [],
                "timing": {"adapters": 0.0, "queue": 0.0, "engine": 0.0, "batch": 1}}

    def info(self):
        return {}


def lora(folder):
    a = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    folder.mkdir(parents=True)
    (folder / LORA).write_bytes(st_save({"unet.down.lora.down.weight": a,
                                         "unet.down.lora.up.weight": np.zeros((32, 4), np.float32)}))


@pytest.fixture()
def replica(monkeypatch):
    """`make(args)` -> (Ingress instance built by its real constructor, stub drawing); `client(prefix)` the app."""
    cls = D.Ingress.func_or_class.__mro__[1]  # ours, under Serve's wrapper (whose async __init__ starts the app)
    init = cls.__init__
    scope = init.__globals__  # Serve's decorator made a copy of the class: its own module globals
    for policy in {id(D.POLICY): D.POLICY, id(scope["POLICY"]): scope["POLICY"]}.values():
        monkeypatch.setattr(policy, "api_keys", [])
        monkeypatch.setattr(policy, "max_body_bytes", policy.max_body_bytes)
    holder = types.SimpleNamespace(servable_object=None, app_name="diffray")
    monkeypatch.setattr(serve, "get_replica_context", lambda: holder)

    def make(args: dict, native: int | None = None):
        if native is not None:
            monkeypatch.setitem(scope, "_native_size", lambda _path: native)
        inst = object.__new__(cls)
        init(inst, object(), {"model": "builtin:tiny", "feedback": {"enabled": False},
                                 "auth": {"allow_unauthenticated": True}, **args})
        inst.generator, inst.drawing = None, StubDrawing()  # draw in the "replica" itself, with the stub
        holder.servable_object = inst
        return inst

    def client(prefix: str = "") -> TestClient:
        async def mounted(scope, receive, send):  # as Serve's proxy does: the full path, root_path = the prefix
            if prefix and scope["type"] == "http":
                scope = {**scope, "root_path": prefix}
            await D.api(scope, receive, send)

        return TestClient(mounted, raise_server_exceptions=False)

    return types.SimpleNamespace(make=make, client=client)


# ------------------------------------------------------------------------------------------ default size
def test_a_native_size_above_max_side_refuses_to_start_naming_the_limit(replica):
    with pytest.raises(ConfigError) as err:
        replica.make({"limits": {"max_side": 512}}, native=1024)  # an SDXL or Flux base under the default limit
    assert err.value.field == "limits.max_side" and "1024" in str(err.value)


@pytest.mark.parametrize("args,native,want", [({"limits": {"max_side": 1024}}, 1024, 1024),
                                              ({"default_size": 512}, 1024, 512), ({}, 64, 64)])
def test_a_request_without_a_size_is_drawn_at_a_default_within_the_limits(replica, args, native, want):
    inst = replica.make(args, native=native)
    c = replica.client()
    assert c.post("/v1/images/generations", json={"prompt": "x"}).status_code == 200
    assert c.post("/v1/generate", json={"prompt": "x"}).status_code == 200
    assert [(j.width, j.height) for j, _ in inst.drawing.jobs] == [(want, want)] * 2


# ---------------------------------------------------------------------------------- model ids and base
@pytest.mark.parametrize("path,body,param", [
    ("/v1/images/generations", {"prompt": "x", "model": ""}, "model"),
    ("/v1/generate", {"prompt": "x", "adapter": ""}, "adapter"),
    ("/v1/generate", {"prompt": "x", "adapters": [{"id": ""}]}, "adapters.0.id"),
])
def test_an_empty_model_is_a_400_naming_it_everywhere(replica, tmp_path, path, body, param):
    inst = replica.make({"adapters_dir": str(tmp_path)})
    r = replica.client().post(path, json=body)
    assert (r.status_code, r.json()["error"]["param"]) == (400, param) and inst.drawing.jobs == []


def test_ids_that_name_the_base_model_are_never_listed_or_served_as_adapters(replica, tmp_path, caplog):
    for name in ("base", "dall-e-2", "dall-e-3", "gpt-image-1", "fine"):
        lora(tmp_path / name)
    (tmp_path / "gpt-image-1.safetensors").write_bytes((tmp_path / "fine" / LORA).read_bytes())
    inst = replica.make({"adapters_dir": str(tmp_path)})
    c = replica.client()
    with caplog.at_level("WARNING", logger="diffray.serve.registry"):  # whatever level earlier tests left
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids == ["base", "fine"]
    assert "entry 'dall-e-3' is not served: its id names the base model" in caplog.text
    for model in ("base", "dall-e-3"):
        assert c.post("/v1/images/generations", json={"prompt": "x", "model": model}).status_code == 200
    assert [j.adapters for j, _ in inst.drawing.jobs] == [(), ()]
    r = c.post("/v1/generate", json={"prompt": "x", "adapter": "base"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "adapter") and "base model" in r.text
    assert c.post("/v1/generate", json={"prompt": "x", "adapter": "fine"}).status_code == 200


# ------------------------------------------------------------------------------------------- playground
def page_urls(html: str) -> list[str]:
    return re.findall(r'(?:href|src)="([^"]+)"', html)


def api_paths(script: str) -> list[tuple[str, str]]:
    return re.findall(r'api\("(GET|POST)", "([^"]+)"', script)


@pytest.mark.parametrize("prefix", ["", "/diffray", "/team/images"])
def test_the_playground_loads_and_calls_the_api_under_its_route_prefix(replica, tmp_path, prefix):
    """What a browser does with the page, by URL resolution: the page at `<prefix>/` (a bare `<prefix>` is
    redirected there, so relative URLs resolve inside the app), its style and script relative to it, and the
    API calls resolved against the script's own URL (app.js: `new URL("../", document.currentScript.src)`)."""
    lora(tmp_path / "fine")
    replica.make({"adapters_dir": str(tmp_path)})
    c = replica.client(prefix)
    if prefix:
        r = c.get(prefix, follow_redirects=False)
        assert r.status_code in (307, 308) and urlsplit(r.headers["location"]).path == prefix + "/"
    page = f"http://testserver{prefix}/"
    r = c.get(page)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    urls = [urljoin(page, u) for u in page_urls(r.text)]
    assert sorted(urlsplit(u).path for u in urls) == [f"{prefix}/playground/app.js", f"{prefix}/playground/style.css"]
    for url in urls:
        assert c.get(url).status_code == 200
    script_url = next(u for u in urls if u.endswith(".js"))
    calls = api_paths(c.get(script_url).text)
    assert {p for _, p in calls} == {"v1/models", "v1/generate", "v1/feedback"}
    root = urljoin(script_url, "../")
    assert c.get(urljoin(root, "v1/models")).json()["data"][1]["id"] == "fine"
    assert c.post(urljoin(root, "v1/generate"), json={"prompt": "x", "adapter": "fine"}).status_code == 200
    r = c.post(urljoin(root, "v1/feedback"), json={})
    assert urlsplit(urljoin(root, "v1/feedback")).path == f"{prefix}/v1/feedback" and r.status_code != 405
