"""Hostile input against a real Serve app over HTTP on 127.0.0.1 (issue 23): text the tokenizer cannot
encode, empty or garbage control images, a bad request among its batch-mates, broken / replaced / deleted
registry entries, ids with a trailing newline, duplicate Authorization headers, timeouts that must cancel
the generation between sampler steps, a mixed load where 1 request in 4 is hostile, and Schemathesis
against the app's own OpenAPI schema. Every answer is a 4xx naming the field (never a 5xx), and no
message carries a server path, an object repr or a tensor.

Two apps share one Serve instance: the hostile one (1 Generator replica, batching on) and a slow one at
/slow with a 3 s timeout for the cancellation tests.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import random
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import KEY, Server, adapter_registry, app_args, b64_png, control_disc, free_port, png_array
from testkit.wait import wait_until

pytestmark = [pytest.mark.e2e]

APP, SLOW_APP = "diffray-hostile", "diffray-slow"
G, I, F = "/v1/generate", "/v1/images/generations", "/v1/feedback"


class Hostile(Server):
    def __init__(self, url: str, registry: Path, spare: Path, model_path: str):
        super().__init__(url, registry)
        self.spare, self.model_path = spare, model_path

    def ok(self, path: str = G, **body) -> dict:
        status, js, _ = self.call("POST", path, {"seed": 3, **body})
        assert status == 200, js
        return js


@pytest.fixture(scope="module")
def hostile(ray_cluster, tiny_model_path, tmp_path_factory):
    from ray import serve

    from diffray.serve.app import build_app
    from testkit.adapters import random_lora, random_textual_inversion

    reg, spare = tmp_path_factory.mktemp("hostile-adapters"), tmp_path_factory.mktemp("spare")
    adapter_registry(tiny_model_path, reg)
    for token, seed in (("p", 5), ("q", 6), ("e", 7)):
        random_textual_inversion(tiny_model_path, spare / f"ti-{token}", f"<{token}-tok>", seed=seed)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args(reg, reg.parent / "fb.db")), name=APP, route_prefix="/")
    slow_reg = tmp_path_factory.mktemp("slow-adapters")  # an adapter `fine` and entries that name the base model
    for name in ("fine", "base", "dall-e-3"):
        random_lora(tiny_model_path, slow_reg / name, seed=9)
    (slow_reg / "gpt-image-1.safetensors").write_bytes((slow_reg / "fine" / "pytorch_lora_weights.safetensors")
                                                       .read_bytes())
    slow = app_args(slow_reg, reg.parent / "fb-slow.db",
                    limits={"max_side": 256, "max_steps": 1000, "request_timeout_s": 3}, batching={"enabled": False})
    serve.run(build_app(slow), name=SLOW_APP, route_prefix="/slow")
    yield Hostile(f"http://127.0.0.1:{port}", reg, spare, tiny_model_path)
    serve.delete(APP)
    serve.delete(SLOW_APP)
    serve.shutdown()


def assert_clean_4xx(server: Hostile, status: int, js: dict, param: str | None = None) -> None:
    """A 4xx in OpenAI's shape naming `param`, whose message leaks nothing about the server."""
    assert 400 <= status < 500, (status, js)
    err = js["error"]
    if param is not None:
        assert err["param"] == param, js
    message = err["message"]
    for leak in (str(server.registry), server.model_path, "/tmp/", "Traceback", "tensor(", " at 0x", "\\ud"):
        assert leak not in message, (leak, message)


# ------------------------------------------------------------------------------------------ hostile text
TEXT_CASES = [  # (path, raw JSON body, param); JSON escapes carry lone surrogates and control characters
    (G, b'{"prompt": "a \\ud800 b"}', "prompt"),
    (G, b'{"prompt": "\\udfff"}', "prompt"),
    (G, b'{"prompt": "ok", "negative_prompt": "\\ud83d"}', "negative_prompt"),
    (G, b'{"prompt": "nul \\u0000 byte"}', "prompt"),
    (G, b'{"prompt": "ok", "adapter": "lora-a\\ud800"}', "adapter"),
    (G, b'{"prompt": "ok", "adapters": [{"id": "\\udc00"}]}', "adapters.0.id"),
    (G, b'{"prompt": "ok", "control": {"model": "canny\\u001b", "image": "AAAA"}}', "control.model"),
    (I, b'{"prompt": "\\ud800"}', "prompt"),
    (I, b'{"prompt": "ok", "size": "64x64\\ud800"}', "size"),
    (I, b'{"prompt": "ok", "user": "\\udbff"}', "user"),
    (F, b'{"prompt": "\\ud800", "choice": "left", "images": []}', "prompt"),
]


@pytest.mark.parametrize("path,raw,param", TEXT_CASES, ids=[f"{p}:{r[:40]!r}" for p, r, _ in TEXT_CASES])
def test_text_the_tokenizer_cannot_encode_is_400_naming_the_field(hostile, path, raw, param):
    status, js, _ = hostile.call("POST", path, raw=raw)
    assert_clean_4xx(hostile, status, js, param)


def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _bomb() -> str:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))).decode()


GARBAGE_IMAGES = {"empty": "", "data-url-empty": "data:image/png;base64,", "bare-data": "data:", "AAAA": "AAAA",
                  "random": base64.b64encode(os.urandom(300)).decode(), "text": base64.b64encode(b"hello").decode(),
                  "truncated-png": base64.b64encode(_png_bytes(control_disc())[:120]).decode(), "bomb": _bomb(),
                  "not-base64": "%%%%", "whitespace": "    "}


@pytest.mark.parametrize("field", ["image", "raw_image"])
@pytest.mark.parametrize("name", sorted(GARBAGE_IMAGES))
def test_empty_or_garbage_control_images_are_400(hostile, field, name):
    body = {"prompt": "x", "control": {"model": "canny", field: GARBAGE_IMAGES[name]}}
    status, js, _ = hostile.call("POST", G, body)
    assert_clean_4xx(hostile, status, js, f"control.{field}")


def test_a_one_pixel_control_image_is_fine(hostile):
    one = b64_png(Image.new("RGB", (1, 1), (255, 0, 0)))
    assert len(hostile.ok(prompt="x", control={"model": "canny", "raw_image": one})["images"]) == 1


def test_a_bad_request_among_its_batch_mates_fails_alone(hostile):
    goods = [{"prompt": f"a red circle {i}", "seed": 100 + i} for i in range(6)]
    alone = [png_array(hostile.ok(**g)["images"][0]["b64_json"]) for g in goods]
    bad = b'{"prompt": "bad \\ud800 prompt", "seed": 1}'
    barrier = threading.Barrier(12)

    def send(i):
        barrier.wait()
        return hostile.call("POST", G, goods[i // 2] if i % 2 == 0 else None, raw=None if i % 2 == 0 else bad)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, range(12)))
    for i, (status, js, _) in enumerate(results):
        if i % 2:
            assert_clean_4xx(hostile, status, js, "prompt")
        else:
            assert status == 200, js
            assert np.abs(png_array(js["images"][0]["b64_json"]) - alone[i // 2]).max() <= 1


MIXED = [(), (("lora-a", 1.0),), (("lora-a", 0.5),), (("lora-b", 1.0),)]  # base, A, A at 0.5, B


def _mixed_body(adapters: tuple) -> dict:
    return {"prompt": "a red circle", "seed": 11, "adapters": [{"id": a, "weight": w} for a, w in adapters]}


def test_mixed_concurrent_requests_each_equal_their_image_alone(hostile):
    """Base, A, A at weight 0.5 and B sent at once: the replica batches them across adapters, the engine
    runs base, A and B in one pipeline call (mixed-adapter batching) and A at 0.5 in another, and each
    answer is its one-at-a-time image. Rounds repeat until the replica's own batch log shows a batch with
    fewer pipeline calls than jobs, so the test cannot pass by the requests running one by one or one
    call per adapter."""
    alone = [_pixels(hostile.ok(**_mixed_body(a))) for a in MIXED]
    assert min(np.abs(x - y).mean() for i, x in enumerate(alone) for y in alone[i + 1:]) > 1  # all differ
    for _ in range(10):
        runs = _info(APP)["runs"]
        barrier = threading.Barrier(len(MIXED))

        def send(adapters, barrier=barrier):
            barrier.wait()
            return hostile.call("POST", G, _mixed_body(adapters))

        with ThreadPoolExecutor(len(MIXED)) as pool:
            results = list(pool.map(send, MIXED))
        for adapters, want, (status, js, _) in zip(MIXED, alone, results):
            assert status == 200, js
            assert np.abs(_pixels(js) - want).max() <= 1, adapters  # batch-shape fp noise at most
        info = _info(APP)  # nothing else runs on this replica meanwhile: the new runs are this round's
        batches = [tuple(b) for b in info["batches"][len(info["batches"]) - (info["runs"] - runs):]]
        assert all(calls >= (2 if jobs == 4 else 1) for jobs, calls in batches), batches  # A, A at 0.5: 2 calls
        if any(jobs > calls for jobs, calls in batches):
            return
    raise AssertionError(f"no batch mixing adapters in 10 rounds: {batches}")


# ------------------------------------------------------------------------------------------ the registry
def _lora_file(hostile) -> bytes:
    return (hostile.registry / "lora-a" / "pytorch_lora_weights.safetensors").read_bytes()


def _broken_entries(hostile) -> dict[str, dict[str, bytes]]:
    import torch
    from safetensors.torch import load, save

    good = _lora_file(hostile)
    sd = load(good)
    lora = "pytorch_lora_weights.safetensors"
    return {
        "bad-truncated": {lora: good[: len(good) // 2]},
        "bad-empty": {lora: b""},
        "bad-pickle": {lora: b"\x80\x04\x95" + os.urandom(100)},
        "bad-header": {lora: (1 << 40).to_bytes(8, "little") + b"{}"},
        "bad-nan": {lora: save({k: torch.full_like(v, float("nan")) for k, v in sd.items()})},
        "bad-card-list": {lora: good, "diffray_card.json": b"[1, 2, 3]"},
        "bad-card-deep": {lora: good, "diffray_card.json": b"[" * 30_000 + b"]" * 30_000},
        "bad-card-nan": {lora: good, "diffray_card.json": b'{"base_model": NaN}'},
        "bad-no-artifact": {"pytorch_lora_weights.bin": b"pickle"},
        "bad-ti-two": {"learned_embeds.safetensors": save({"<a>": torch.ones(1, 32), "<b>": torch.ones(1, 32)})},
        "bad-cn-config": {"config.json": b"[]", "diffusion_pytorch_model.safetensors": good},
        "bad-shapes": {lora: save({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in sd.items()})},
    }


def test_broken_registry_entries_are_listed_unavailable_and_answer_422(hostile):
    entries = _broken_entries(hostile)
    for name, files in entries.items():
        (hostile.registry / name).mkdir()
        for fname, data in files.items():
            (hostile.registry / name / fname).write_bytes(data)
    status, js, _ = hostile.call("GET", "/v1/models")
    assert status == 200, js
    listed = {m["id"]: m for m in js["data"]}
    loads_but_does_not_fit = {"bad-shapes", "bad-cn-config"}  # well-formed files: refused when loaded
    for name in entries:
        assert listed[name]["available"] is (name in loads_but_does_not_fit), listed[name]
        if name not in loads_but_does_not_fit:
            assert listed[name]["reason"] and str(hostile.registry) not in listed[name]["reason"]
    assert listed["lora-a"]["available"] and listed["ti-x"]["available"]
    for name in set(entries) - {"bad-cn-config"}:
        status, js, _ = hostile.call("POST", G, {"prompt": "x", "adapter": name})
        assert_clean_4xx(hostile, status, js, "adapter")
        assert status == 422 and name in js["error"]["message"], js
        hostile.ok(prompt="still fine", adapter="lora-a")
    status, js, _ = hostile.call("POST", G, {"prompt": "x", "control": {"model": "bad-cn-config",
                                                                         "image": b64_png(control_disc())}})
    assert_clean_4xx(hostile, status, js, "control.model")
    assert "bad-cn-config" in js["error"]["message"]
    for name in entries:
        shutil.rmtree(hostile.registry / name)


def _publish(src: Path, dst: Path) -> None:
    """The documented publish-by-rename: copy beside, swap into place."""
    tmp = dst.parent / f".{dst.name}.incoming"
    shutil.copytree(src, tmp)
    if dst.exists():
        old = dst.parent / f".{dst.name}.old"
        dst.rename(old)
        tmp.rename(dst)
        shutil.rmtree(old)
    else:
        tmp.rename(dst)


def _pixels(js: dict) -> np.ndarray:
    return png_array(js["images"][0]["b64_json"])


def test_resident_ti_replaced_on_disk_drops_its_old_token(hostile):
    baseline_p = _pixels(hostile.ok(prompt="a photo of <p-tok>"))  # <p-tok> is not a token yet
    baseline_q = _pixels(hostile.ok(prompt="a photo of <q-tok>"))
    _publish(hostile.spare / "ti-p", hostile.registry / "ti-swap")
    with_p = _pixels(hostile.ok(prompt="a photo of <p-tok>", adapter="ti-swap"))
    assert np.abs(with_p - baseline_p).mean() > 1  # resident: the token means its embedding
    _publish(hostile.spare / "ti-q", hostile.registry / "ti-swap")  # same id, new content and token
    with_q = _pixels(hostile.ok(prompt="a photo of <q-tok>", adapter="ti-swap"))
    assert np.abs(with_q - baseline_q).mean() > 1
    assert (_pixels(hostile.ok(prompt="a photo of <p-tok>")) == baseline_p).all()  # the old token is gone
    hostile.ok(prompt="others are fine", adapter="lora-a")
    shutil.rmtree(hostile.registry / "ti-swap")


def test_deleted_resident_adapters_then_evicted_fail_nothing_else(hostile):
    for i in range(4):
        shutil.copytree(hostile.registry / "lora-a", hostile.registry / f"evict-{i}")
    _publish(hostile.spare / "ti-e", hostile.registry / "evict-ti")
    hostile.ok(prompt="x", adapter="evict-0")
    hostile.ok(prompt="a <e-tok>", adapter="evict-ti")
    shutil.rmtree(hostile.registry / "evict-0")
    shutil.rmtree(hostile.registry / "evict-ti")
    for i in (1, 2, 3, 1, 2, 3):  # three sets per replica: the deleted ones are evicted along the way
        hostile.ok(prompt="x", adapter=f"evict-{i}")
    for gone in ("evict-0", "evict-ti"):
        status, js, _ = hostile.call("POST", G, {"prompt": "x", "adapter": gone})
        assert status == 404 and js["error"]["param"] == "adapter"
    for i in (1, 2, 3):
        shutil.rmtree(hostile.registry / f"evict-{i}")


def test_least_recently_used_adapter_is_evicted_and_reloads_the_same(hostile):
    """Four LoRAs through a replica that holds three adapter sets: the least recently used one leaves the
    pipeline, and used again it reloads to the very image it gave before."""
    from testkit.adapters import random_lora

    ids = [f"lru-{i}" for i in range(4)]
    for i, name in enumerate(ids):
        random_lora(hostile.model_path, hostile.registry / name, seed=20 + i)
    first = {name: _pixels(hostile.ok(prompt="lru", adapter=name)) for name in ids[:3]}
    assert _info(APP)["resident"] == sorted(ids[:3])  # the cap is 3 sets: anything older has gone
    hostile.ok(prompt="lru", adapter=ids[0])  # now lru-1 is the least recently used
    first[ids[3]] = _pixels(hostile.ok(prompt="lru", adapter=ids[3]))
    assert _info(APP)["resident"] == sorted([ids[0], ids[2], ids[3]])
    again = _pixels(hostile.ok(prompt="lru", adapter=ids[1]))  # reloads, evicting lru-2
    assert _info(APP)["resident"] == sorted([ids[0], ids[1], ids[3]])
    assert (again == first[ids[1]]).all()
    assert min(np.abs(first[a] - first[b]).mean() for a in ids for b in ids if a < b) > 1  # all differ
    for name in ids:
        shutil.rmtree(hostile.registry / name)

@pytest.mark.parametrize("path,body,param", [
    (G, {"prompt": "x", "adapter": "lora-a\n"}, "adapter"),
    (G, {"prompt": "x", "adapters": [{"id": "lora-a\n"}]}, "adapters.0.id"),
    (I, {"prompt": "x", "model": "lora-a\n"}, "model"),
    (I, {"prompt": "x", "size": "64x64\n"}, "size"),
    (G, {"prompt": "x", "control": {"model": "cn-x\n", "image": "AAAA"}}, "control.model"),
    (I, {"prompt": "x", "model": ""}, "model"),  # was the base model, silently
    (G, {"prompt": "x", "adapter": ""}, "adapter"),
    (G, {"prompt": "x", "adapters": [{"id": ""}]}, "adapters.0.id"),
    (G, {"prompt": "x", "adapter": "dall-e-3"}, "adapter"),  # a name the images API gives the base model
])
def test_ids_and_sizes_must_match_whole(hostile, path, body, param):
    status, js, _ = hostile.call("POST", path, body)
    assert_clean_4xx(hostile, status, js, param)
    assert status == 400


def test_the_playground_under_a_route_prefix_loads_its_assets_and_reaches_its_api(hostile):
    """Served at /slow/, the page's stylesheet and script and the API paths its script resolves against the
    app's root are the app's own (absolute /playground/... and /v1/... reached the app at / instead)."""
    import re
    from urllib.parse import urljoin

    status, page, _ = hostile.call("GET", "/slow/", key=None)
    assert status == 200
    assets = re.findall(r'(?:href|src)="([^"]+)"', page["text"])
    assert sorted(assets) == ["playground/app.js", "playground/style.css"]
    for asset in assets:
        assert urljoin("/slow/", asset).startswith("/slow/playground/")
        assert hostile.call("GET", urljoin("/slow/", asset), key=None)[0] == 200
    status, script, _ = hostile.call("GET", "/slow/playground/app.js", key=None)
    assert '"v1/models"' in script["text"] and not re.search(r"[\x27\"]/v1/", script["text"])  # no absolute URL
    status, models, _ = hostile.call("GET", urljoin(urljoin("/slow/", "playground/app.js"), "../v1/models"))
    assert status == 200 and "data" in models


def test_the_playground_at_a_bare_route_prefix_redirects_into_the_app(hostile):
    """`/slow` (no slash) redirects to `/slow/`, so the page's relative URLs resolve inside the app."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(hostile.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("GET", "/slow")
        r = conn.getresponse()
        assert r.status in (307, 308) and urlsplit(r.getheader("location")).path == "/slow/", (r.status, r.headers)
    finally:
        conn.close()


def test_ids_that_name_the_base_model_are_never_listed_or_served_as_adapters(hostile):
    """The slow app's registry holds `fine` and entries named base, dall-e-3 and gpt-image-1 (a bare
    .safetensors): the images API gives those names the base model, so they are not listed and a request for
    them is drawn by the base model, at its native size (64) when it gives none; /v1/generate refuses them."""
    status, models, _ = hostile.call("GET", "/slow/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["base", "fine", "canny"]  # canny: configured
    drawn = {}
    for model in ("base", "dall-e-3", "gpt-image-1", "fine"):
        status, js, _ = hostile.call("POST", "/slow" + I, {"prompt": "a red circle", "model": model, "seed": 3})
        assert status == 200, js
        drawn[model] = png_array(js["data"][0]["b64_json"])
    assert drawn["base"].shape == (64, 64, 3)
    assert np.array_equal(drawn["dall-e-3"], drawn["base"]) and np.array_equal(drawn["gpt-image-1"], drawn["base"])
    assert not np.array_equal(drawn["fine"], drawn["base"])  # the LoRA of that name draws otherwise
    status, js, _ = hostile.call("POST", "/slow" + G, {"prompt": "x", "adapter": "base"})
    assert status == 400 and js["error"]["param"] == "adapter" and "base model" in js["error"]["message"]


@pytest.mark.parametrize("values", [("Bearer " + KEY, "Bearer nope"), ("Bearer nope", "Bearer " + KEY),
                                    ("Bearer " + KEY, "Bearer " + KEY)])
def test_duplicate_authorization_headers_are_refused(hostile, values):
    host, port = hostile.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("GET", "/v1/models")
    for v in values:
        conn.putheader("Authorization", v)
    conn.endheaders()
    resp = conn.getresponse()
    js = json.loads(resp.read())
    conn.close()
    assert resp.status == 400 and js["error"]["param"] == "authorization"


# ----------------------------------------------------------------------------------- timeouts cancel work
def _info(app: str = SLOW_APP) -> dict:
    """The Generator replica's own figures (resident adapters, batches, abandoned jobs); each app has one."""
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name=app).info.remote().result()


def _wait_idle(count_before: int) -> dict:
    """The slow replica's info once it has abandoned one more job and holds no pipeline call."""
    def freed() -> dict | None:
        info = _info()
        return info if len(info["abandoned"]) > count_before and not info["busy"] else None

    return wait_until(freed, "the replica to abandon the job and free itself", interval=0.1)


LONG = {"prompt": "a long one", "width": 256, "height": 256, "steps": 900, "seed": 1}


@pytest.mark.parametrize("scheduler,steps", [("default", 1000), ("ddim", 1000), ("dpmpp_2m", 999)])
def test_more_steps_than_the_sampler_can_schedule_is_400(hostile, scheduler, steps):
    """Within limits.max_steps but beyond what the sampler can index (DDPM's 1000th step asked for timestep
    1000 of 1000 and crashed the pipeline with an IndexError)."""
    body = {"prompt": "x", "width": 8, "height": 8, "steps": steps, "scheduler": scheduler}
    status, js, _ = hostile.call("POST", "/slow" + G, body)
    assert_clean_4xx(hostile, status, js, "steps")


def test_a_timed_out_generation_frees_its_replica_within_one_step(hostile):
    before = len(_info()["abandoned"])
    status, js, _ = hostile.call("POST", "/slow" + G, LONG)
    assert status == 504 and js["error"]["type"] == "timeout"
    info = _wait_idle(before)
    why, steps = info["abandoned"][-1]
    assert why == "cancel" and steps <= 1, info  # stopped by the ingress's cancel at the next step
    status, js, _ = hostile.call("POST", "/slow" + G, {"prompt": "next", "steps": 1})
    assert status == 200 and len(js["images"]) == 1  # the next request is served normally


def test_a_client_that_goes_away_cancels_its_generation(hostile):
    before = len(_info()["abandoned"])
    host, port = hostile.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=1.0)
    conn.request("POST", "/slow" + G, json.dumps(LONG), {"Authorization": f"Bearer {KEY}",
                                                         "Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()  # the client hangs up long before the server's 3 s timeout
    info = _wait_idle(before)
    why, steps = info["abandoned"][-1]
    assert why == "cancel" and steps <= 1, info


# ------------------------------------------------------------------------------------------- mixed load
def _hostile_requests(hostile) -> list[tuple[str, dict | None, bytes | None]]:
    return [(p, None, raw) for p, raw, _ in TEXT_CASES] + [
        (G, {"prompt": "x", "control": {"model": "canny", "image": v}}, None) for v in GARBAGE_IMAGES.values()] + [
        (G, {"prompt": "x", "adapter": "nope"}, None), (G, {"prompt": "x", "steps": 10_000}, None),
        (I, {"prompt": "x", "model": "../../etc/passwd"}, None), (G, {"prompt": "x" * 400_000}, None),
        (G, None, b'{"prompt": '), (G, {"prompt": "x", "n": True}, None), (F, {"prompt": "x"}, None)]


def _well_formed() -> list[dict]:
    ctl = {"model": "canny", "raw_image": b64_png(control_disc())}
    return [{"prompt": "a red circle"}, {"prompt": "two", "n": 2}, {"prompt": "lora", "adapter": "lora-a"},
            {"prompt": "a <x-tok>", "adapter": "ti-x"}, {"prompt": "controlled", "control": ctl},
            {"prompt": "cn registry", "control": {"model": "cn-x", "image": b64_png(control_disc())}}]


def test_mixed_load_one_in_four_hostile_every_well_formed_request_succeeds(hostile):
    rng = random.Random(23)
    bad, good = _hostile_requests(hostile), _well_formed()
    plan = [("bad", rng.choice(bad)) if i % 4 == 3 else ("good", rng.choice(good)) for i in range(48)]

    def send(item):
        kind, req = item
        if kind == "bad":
            path, body, raw = req
            return kind, hostile.call("POST", path, body, raw=raw)
        return kind, hostile.call("POST", G, {**req, "seed": rng.randrange(1000)})

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, plan))
    for kind, (status, js, _) in results:
        if kind == "good":
            assert status == 200, js
        else:
            assert_clean_4xx(hostile, status, js)
    assert hostile.call("GET", "/healthz", key=None)[0] == 200


# ------------------------------------------------------------------------------------------- Schemathesis
# Driven through schemathesis' Python API (one Hypothesis run per operation and generation mode): its
# pytest plugin (`from_fixture`) does not run under pytest 9.2.
OPERATIONS = [("GET", "/healthz"), ("GET", "/v1/models"), ("GET", "/v1/status"), ("POST", "/v1/images/generations"),
              ("POST", "/v1/generate"), ("POST", "/v1/feedback")]
CHECK_NAMES = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_schema_conformance", "ignored_auth")


@pytest.fixture(scope="module")
def openapi_schema(hostile):
    schemathesis = pytest.importorskip("schemathesis")
    return schemathesis.openapi.from_url(hostile.url + "/openapi.json")


def test_the_fuzzed_operations_are_every_operation(openapi_schema):
    assert {r.ok().label for r in openapi_schema.get_all_operations()} == {f"{m} {p}" for m, p in OPERATIONS}


def fuzz(schema, method: str, path: str, examples: int) -> dict[str, int]:
    """Hypothesis over the operation's schema, positive then negative data; every answer checked for no
    5xx, documented status, content type and body, and enforced auth. Returns examples run per mode."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import CHECKS
    from schemathesis.generation.modes import GenerationMode

    checks = [CHECKS.get_one(name) for name in CHECK_NAMES]
    op = schema[path][method]
    has_input = bool(op.body) or any(True for _ in op.iter_parameters())
    counts = {}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_input else (GenerationMode.POSITIVE,):
        seen = [0]

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            seen[0] += 1
            case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=checks, timeout=120)

        run()
        counts[mode.value] = seen[0]
    return counts


# 50 examples per operation and mode in the default suite (CI), 500 in make test-eval: more draws of the same
# operations are robustness, not a code path (the slow suite's 150 were cut for CI's budget).
@pytest.mark.parametrize("examples", [50, pytest.param(500, marks=[pytest.mark.slow, pytest.mark.eval])])
@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schemathesis_examples_per_operation(openapi_schema, method, path, examples):
    counts = fuzz(openapi_schema, method, path, examples)
    print(f"schemathesis {method} {path}: {counts}")
    if method == "POST":
        assert counts == {"positive": examples, "negative": examples}
