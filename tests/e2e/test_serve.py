"""The Serve application over real HTTP: one app (2 Generator replicas, tiny model, 64 px, 4 steps) on a
local Ray cluster for the whole module. Adapters are made without training by the project's exporters
(random LoRA B, random TI vector, ControlNet from the UNet).

Covers: base / LoRA / two LoRAs / TI / ControlNet generations, same seed -> same image, the official
openai client, a bad-request corpus (4xx naming the field, zero 5xx), overload (503 + Retry-After),
killing a Generator replica under load, `diffray generate --url`, and new adapters without redeploy.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import (KEY, Server, adapter_registry, b64_png, control_disc, free_port, lower, png_array,
                           server_timing)
from testkit.procs import interrupt_group
from testkit.wait import wait_until

from diffray.data.conditioning import make_preprocessor

pytestmark = [pytest.mark.e2e]

APP = "diffray-test"


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_path, tmp_path_factory):
    from ray import serve

    from diffray.serve.app import build_app

    reg = adapter_registry(tiny_model_path, tmp_path_factory.mktemp("adapters"))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"model": "builtin:tiny-random", "adapters_dir": str(reg), "default_steps": 4,
            "controlnets": {"canny": {"path": "builtin:tiny-random", "subfolder": "controlnet"}},
            "limits": {"max_side": 256, "max_n": 4, "max_body_bytes": 200_000, "request_timeout_s": 60},
            "auth": {"api_keys": [KEY]},
            "generator": {"num_replicas": 2, "num_cpus": 0.5, "torch_threads": 1, "max_ongoing_requests": 2,
                          "max_queued_requests": 2, "max_adapters_per_replica": 3},
            "batching": {"enabled": True, "max_batch_size": 2, "batch_wait_timeout_s": 0.005},
            "ingress": {"num_cpus": 0.25}, "feedback": {"path": str(reg.parent / "feedback.db")}}
    serve.run(build_app(args), name=APP, route_prefix="/")
    yield Server(f"http://127.0.0.1:{port}", reg)
    serve.delete(APP)
    serve.shutdown()


# ------------------------------------------------------------------------------------------- happy paths
def test_health_models_docs(server, tiny_model_path):
    assert server.call("GET", "/healthz", key=None)[:2] == (200, {"status": "ok"})
    status, js, _ = server.call("GET", "/v1/models")
    kinds = {m["id"]: m["kind"] for m in js["data"]}
    assert status == 200 and kinds == {"base": "base", "lora-a": "lora", "lora-b": "lora",
                                       "ti-x": "textual_inversion", "cn-x": "controlnet", "canny": "controlnet"}
    # the adapters' cards name the trainer's local model folder: clients see its name, not the server's path
    bases = {m["id"]: m.get("base_model") for m in js["data"] if m["kind"] == "lora"}
    assert bases == {"lora-a": Path(tiny_model_path).name, "lora-b": Path(tiny_model_path).name}, bases
    status, spec, _ = server.call("GET", "/openapi.json", key=None)
    assert status == 200 and {"/v1/images/generations", "/v1/generate", "/v1/models"} <= set(spec["paths"])
    assert server.call("GET", "/docs", key=None)[0] == 200


def test_generations_with_every_adapter_kind_and_same_seed_same_image(server):
    single, _ = server.generate(prompt="a red circle")
    base, _ = server.generate(prompt="a red circle", n=2)
    assert base[0].shape == (64, 64, 3) and np.abs(base[0] - base[1]).max() > 0  # seeds 7 and 8 differ
    again, _ = server.generate(prompt="a red circle", n=2)
    assert all((a == b).all() for a, b in zip(base, again))  # same seed -> same pixels
    lora_a, _ = server.generate(prompt="a red circle", adapter="lora-a")
    lora_a2, _ = server.generate(prompt="a red circle", adapter="lora-a")
    both, _ = server.generate(prompt="a red circle", adapters=[{"id": "lora-a", "weight": 1.0},
                                                               {"id": "lora-b", "weight": 0.7}])
    assert (lora_a[0] == lora_a2[0]).all()
    assert np.abs(lora_a[0] - base[0]).mean() > 1 and np.abs(both[0] - lora_a[0]).mean() > 1
    back_to_base, _ = server.generate(prompt="a red circle")  # adapters resident, but off for the base
    assert (back_to_base[0] == single[0]).all()
    ti_base, _ = server.generate(prompt="a photo of <x-tok>")
    ti, _ = server.generate(prompt="a photo of <x-tok>", adapter="ti-x")
    assert np.abs(ti[0] - ti_base[0]).mean() > 1
    ctl = {"model": "cn-x", "image": b64_png(control_disc()), "scale": 1.0}
    controlled, _ = server.generate(prompt="a red circle", control=ctl)
    controlled2, _ = server.generate(prompt="a red circle", control=ctl)
    assert np.abs(controlled[0] - base[0]).mean() > 1 and (controlled[0] == controlled2[0]).all()
    server.generate(prompt="a red circle", control={"model": "canny", "raw_image": b64_png(control_disc())})
    # server-side canny (a raw image for a registry ControlNet) == the control computed here; the configured
    # "canny" entry is the tiny model's zero-initialised ControlNet, which leaves any control without effect
    raw, _ = server.generate(prompt="a red circle", control={"model": "cn-x", "raw_image": b64_png(control_disc())})
    local_edges = make_preprocessor("canny")(control_disc())
    edges, _ = server.generate(prompt="a red circle", control={"model": "cn-x", "image": b64_png(local_edges)})
    assert (raw[0] == edges[0]).all() and np.abs(raw[0] - base[0]).mean() > 1
    # the control image moves the tiny model's pixels by about one level only (edges vs disc: mean 0.004,
    # max 1), but deterministically: the raw image itself as the control is a different image
    assert (raw[0] != controlled[0]).any()


def test_openai_client_gets_images(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=2)
    result = client.images.generate(model="lora-a", prompt="a blue square", n=2, size="64x64",
                                    response_format="b64_json", extra_body={"seed": 7})
    got = [png_array(d.b64_json) for d in result.data]
    lora, _ = server.generate(prompt="a blue square", adapter="lora-a", n=2)  # seed 7, 4 steps, as above
    base, _ = server.generate(prompt="a blue square", n=2)
    assert len(got) == 2 and all((g == w).all() for g, w in zip(got, lora))  # the adapter's images
    assert all(np.abs(g - b).mean() > 1 for g, b in zip(got, base))
    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="65x64")
    assert "size" in str(err.value)


@pytest.mark.parametrize("path, body", [
    ("/v1/generate", {"prompt": "a red circle", "steps": 4, "seed": 7, "adapter": "lora-a"}),
    ("/v1/images/generations", {"prompt": "a red circle", "size": "64x64", "model": "base"}),
])
def test_an_answer_says_where_its_time_went(server, path, body):
    t0 = time.perf_counter()
    status, js, headers = server.call("POST", path, body)
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert status == 200, js
    t = server_timing(headers["server-timing"])
    assert list(t) == ["ingress", "generator", "adapters", "queue", "engine"], headers["server-timing"]
    assert t["engine"] > 0 and t["adapters"] >= 0 and t["queue"] >= 0 and int(headers["x-diffray-batch"]) >= 1
    # nested: the replica's parts within the Ingress's call to it, within the handler, within the client's wait
    # (each figure rounded to 0.1 ms)
    assert t["adapters"] + t["queue"] + t["engine"] <= t["generator"] + 0.2
    assert t["generator"] <= t["ingress"] + 0.1 and t["ingress"] <= wall_ms


def test_new_adapter_is_served_without_redeploy(server):
    tmp = server.registry / ".incoming-lora-c"
    shutil.copytree(server.registry / "lora-b", tmp)
    tmp.rename(server.registry / "lora-c")  # the atomic way to publish an artifact
    ids = [m["id"] for m in server.call("GET", "/v1/models")[1]["data"]]
    assert "lora-c" in ids and ".incoming-lora-c" not in ids
    c, _ = server.generate(prompt="a red circle", adapter="lora-c")
    b, _ = server.generate(prompt="a red circle", adapter="lora-b")
    assert (c[0] == b[0]).all()  # same weights, same image


def test_cli_generate_url(server, tmp_path):
    out = tmp_path / "img.png"
    proc = subprocess.run([sys.executable, "-m", "diffray.cli", "generate", "--url", server.url, "-p", "a red circle",
                           "--num-images", "2", "--steps", "4", "--adapter", "lora-a", "--seed", "7",
                           "--guidance", "7.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, env={**_env(), "DIFFRAY_API_KEY": KEY})
    assert proc.returncode == 0, proc.stderr
    files = sorted(tmp_path.glob("img-*.png"))
    assert [f.name for f in files] == ["img-0-0.png", "img-0-1.png"]
    saved = [np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files]
    lora, _ = server.generate(prompt="a red circle", adapter="lora-a", n=2)
    base, _ = server.generate(prompt="a red circle", n=2)
    assert all((s == w).all() and np.abs(s - b).mean() > 1 for s, w, b in zip(saved, lora, base))
    bad = subprocess.run([sys.executable, "-m", "diffray.cli", "generate", "--url", server.url, "-p", "x",
                          "--adapter", "nope", "--out", str(out)], capture_output=True, text=True, timeout=120,
                         env={**_env(), "DIFFRAY_API_KEY": KEY})
    assert bad.returncode != 0 and "unknown adapter" in bad.stderr and "Traceback" not in bad.stderr


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


# ------------------------------------------------------------------------------------------ bad requests
G, I = "/v1/generate", "/v1/images/generations"
TEXT_B64 = base64.b64encode(b"this is not an image at all").decode()
BAD = [  # (name, path, body or raw bytes, expected param, expected status)
    ("empty prompt", I, {"prompt": ""}, "prompt", 400),
    ("blank prompt", G, {"prompt": "   "}, "prompt", 400),
    ("huge prompt", I, {"prompt": "x" * 1001}, "prompt", 400),
    ("missing prompt", I, {"n": 1}, "prompt", 400),
    ("prompt is a number", I, {"prompt": 5}, "prompt", 400),
    ("prompt is a list", G, {"prompt": ["a", "b"]}, "prompt", 400),
    ("n zero", I, {"prompt": "x", "n": 0}, "n", 400),
    ("n above cap", I, {"prompt": "x", "n": 100}, "n", 400),
    ("n wrong type", I, {"prompt": "x", "n": "two"}, "n", 400),
    ("size not multiple of 8", I, {"prompt": "x", "size": "65x64"}, "size", 400),
    ("size above cap", I, {"prompt": "x", "size": "1024x1024"}, "size", 400),
    ("size garbage", I, {"prompt": "x", "size": "big"}, "size", 400),
    ("response_format unknown", I, {"prompt": "x", "response_format": "png"}, "response_format", 400),
    ("model path traversal", I, {"prompt": "x", "model": "../etc/passwd"}, "model", 400),
    ("model is a URL", I, {"prompt": "x", "model": "http://evil.example/lora"}, "model", 400),
    ("model dotdot", I, {"prompt": "x", "model": ".."}, "model", 400),
    ("unknown adapter", I, {"prompt": "x", "model": "nope"}, "model", 404),
    ("unknown field", I, {"prompt": "x", "colour": "red"}, "colour", 400),
    ("malformed JSON", I, b'{"prompt": "x", ', "body", 400),
    ("JSON array body", G, b"[1, 2]", "body", 400),
    ("negative steps", G, {"prompt": "x", "steps": -1}, "steps", 400),
    ("huge steps", G, {"prompt": "x", "steps": 100000}, "steps", 400),
    ("fractional steps", G, {"prompt": "x", "steps": 2.5}, "steps", 400),
    ("negative guidance", G, {"prompt": "x", "guidance": -1}, "guidance", 400),
    ("NaN guidance", G, b'{"prompt": "x", "guidance": NaN}', "guidance", 400),
    ("width not multiple of 8", G, {"prompt": "x", "width": 63}, "width", 400),
    ("height above cap", G, {"prompt": "x", "height": 1024}, "height", 400),
    ("negative seed", G, {"prompt": "x", "seed": -1}, "seed", 400),
    ("unknown scheduler", G, {"prompt": "x", "scheduler": "magic"}, "scheduler", 400),
    ("huge negative prompt", G, {"prompt": "x", "negative_prompt": "y" * 1001}, "negative_prompt", 400),
    ("adapter scale out of range", G, {"prompt": "x", "adapter": "lora-a", "adapter_scale": 100}, "adapter_scale", 400),
    ("adapter id with ../", G, {"prompt": "x", "adapters": [{"id": "../lora-a"}]}, "adapters.0.id", 400),
    ("adapter id is a URL", G, {"prompt": "x", "adapter": "s3://bucket/lora"}, "adapter", 400),
    ("too many adapters", G, {"prompt": "x", "adapters": [{"id": f"a{i}"} for i in range(5)]}, "adapters", 400),
    ("adapter and adapters", G, {"prompt": "x", "adapter": "lora-a", "adapters": [{"id": "lora-b"}]}, "adapters", 400),
    ("ControlNet used as adapter", G, {"prompt": "x", "adapter": "cn-x"}, "adapter", 400),
    ("unknown adapter in list", G, {"prompt": "x", "adapters": [{"id": "lora-a"}, {"id": "zzz"}]}, "adapters.1.id", 404),
    ("control bad base64", G, {"prompt": "x", "control": {"model": "canny", "image": "!!!not base64!!!"}},
     "control.image", 400),
    ("control not an image", G, {"prompt": "x", "control": {"model": "canny", "image": TEXT_B64}}, "control.image", 400),
    ("control unknown model", G, {"prompt": "x", "control": {"model": "depth-xl", "image": TEXT_B64}},
     "control.model", 404),
    ("control model is a LoRA", G, {"prompt": "x", "control": {"model": "lora-a", "image": TEXT_B64}},
     "control.model", 400),
    ("control image and raw image", G, {"prompt": "x", "control": {"model": "canny", "image": TEXT_B64,
                                                                   "raw_image": TEXT_B64}}, "control.image", 400),
    ("control without model", G, {"prompt": "x", "control": {"image": TEXT_B64}}, "control.model", 400),
    ("control scale wrong type", G, {"prompt": "x", "control": {"model": "canny", "image": TEXT_B64,
                                                                "scale": "high"}}, "control.scale", 400),
    ("oversize body", G, {"prompt": "x" * 300_000}, "body", 413),
]


@pytest.mark.parametrize("name,path,body,param,status", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_4xx_naming_the_field(server, name, path, body, param, status):
    raw = body if isinstance(body, bytes) else None
    got, js, _ = server.call("POST", path, None if raw else body, raw=raw)
    assert got == status, js
    assert js["error"]["param"] == param, js
    assert js["error"]["message"] and js["error"]["type"]


@pytest.mark.parametrize("key", [None, "wrong-key", ""])
def test_missing_or_wrong_api_key_is_401(server, key):
    status, js, _ = server.call("POST", G, {"prompt": "x"}, key=key)
    assert status == 401 and js["error"]["param"] == "authorization"
    assert server.call("GET", "/v1/models", key=key)[0] == 401


def test_the_whole_bad_corpus_at_once_changes_nothing(server):
    """Every bad request of the corpus sent concurrently: each is its own 4xx (no 5xx, none answered with
    another's status), and afterwards the server is healthy and renders the same image it did before."""
    before, _ = server.generate(prompt="still fine")

    def one(case):
        _, path, body, _, _ = case
        raw = body if isinstance(body, bytes) else None
        return server.call("POST", path, None if raw else body, raw=raw)[:2]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, BAD))
    assert [(status, js["error"]["param"]) for status, js in answers] == [(b[4], b[3]) for b in BAD]
    assert server.call("GET", "/healthz", key=None)[0] == 200
    after, _ = server.generate(prompt="still fine")
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


# ---------------------------------------------------------------------------------------- overload, failure
def test_overload_answers_503_and_accepted_requests_complete(server):
    body = {"prompt": "load", "steps": 12, "seed": 1}

    def one(i):
        return server.call("POST", G, {**body, "seed": i})

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 4, codes
    for status, js, headers in results:
        if status == 503:
            assert js["error"]["type"] == "overloaded" and int(headers["retry-after"]) >= 0
        else:
            assert len(js["images"]) == 1
    assert server.call("GET", "/healthz", key=None)[0] == 200


def _generator_replicas() -> dict[str, str]:
    """RUNNING Generator replicas of the test app, from Serve's own instance details: {actor name: id}."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    replicas = details["applications"][APP]["deployments"]["Generator"]["replicas"]
    return {r["actor_name"]: r["replica_id"] for r in replicas if r["state"] == "RUNNING"}


def _load(server, stop: threading.Event, results: list, retry: bool) -> None:
    from diffray.errors import RequestError
    from diffray.serve.client import RetryPolicy, post_json

    i = 0
    while not stop.is_set():
        i += 1
        body = {"prompt": "steady", "steps": 4, "seed": i}
        if retry:
            try:
                _, headers = post_json(server.url + G, body, api_key=KEY, timeout=60,
                                       retry=RetryPolicy(attempts=8, backoff_s=0.3))
                results.append((200, lower(headers).get("x-diffray-replica")))
            except RequestError as exc:
                results.append((exc.status, None))
        else:
            status, _, headers = server.call("POST", G, body, timeout=60)
            results.append((status, headers.get("x-diffray-replica")))


def _wait_for_two_replicas(before: set[str], timeout: float = 120) -> set[str]:
    def replaced() -> set[str] | None:
        now = set(_generator_replicas().values())
        return now if len(now) == 2 and now - before else None

    return wait_until(replaced, "a replacement Generator replica", timeout=timeout, interval=0.5)


def _wait_for_answers(results: list, count: int, timeout: float = 120) -> None:
    """Until the load threads have `count` answers."""
    wait_until(lambda: len(results) >= count, f"{count} answers from the load threads", timeout=timeout,
               interval=0.05)


@pytest.mark.parametrize("retry", [False, True], ids=["no-retry", "client-retry"])
def test_killing_a_generator_replica_under_load(server, retry):
    import ray

    replicas = _generator_replicas()
    assert len(replicas) == 2
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(server, stop, results, retry)) for _ in range(3)]
    for t in threads:
        t.start()
    _wait_for_answers(results, 3)  # the load is flowing
    victim_name, victim_id = sorted(replicas.items())[0]
    served_before = len(results)
    ray.kill(ray.get_actor(victim_name, namespace="serve"), no_restart=True)
    _wait_for_answers(results, served_before + 9)  # the load goes on past the loss: 3 more per thread
    stop.set()
    for t in threads:
        t.join(timeout=90)
    failed = [r for r in results if r[0] != 200]
    print(f"kill ({'client retry' if retry else 'no retry'}): {len(results)} requests, {len(failed)} failed "
          f"{[r[0] for r in failed]}")
    assert served_before > 0 and len(results) > served_before
    assert set(r[0] for r in failed) <= {503}, failed  # a lost replica is never a 500
    # at most the requests in flight on the killed replica (its max_ongoing_requests + its batch) fail
    assert len(failed) <= (0 if retry else 3), failed
    survivors = set(replicas.values()) - {victim_id}
    now = _wait_for_two_replicas(set(replicas.values()))
    replacement = now - survivors
    seen = set()
    for i in range(20):  # the replacement serves
        _, headers = server.generate(prompt="after", seed=100 + i)
        seen.add(headers.get("x-diffray-replica"))
        if seen & replacement:
            break
    assert seen & replacement, (seen, replacement)
    print(f"replacement replica {sorted(replacement)} served after {i + 1} request(s)")


# ------------------------------------------------------------------------------------ the shipped config
# `diffray serve configs/serve.yaml` is the README's serve block (tests/e2e/test_readme.py, slow suite), which CI
# runs; both launchers' checks here are the eval matrix.
@pytest.mark.slow
@pytest.mark.eval
@pytest.mark.parametrize("launcher", ["diffray", "serve"])
def test_shipped_config_runs_with_serve_run_and_diffray_serve(launcher, tmp_path):
    """configs/serve.yaml as-is (port and registry moved aside): `serve run FILE` / `diffray serve FILE`
    start a fresh local cluster, answer an OpenAI-style request, and stop on Ctrl-C."""
    import yaml

    port = free_port()
    cfg = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "serve.yaml").read_text())
    cfg["http_options"]["port"] = port
    app_args = cfg["applications"][0]["args"]
    app_args["adapters_dir"] = str(tmp_path / "adapters")
    app_args["feedback"]["path"] = str(tmp_path / "feedback.db")
    app_args["generator"]["num_cpus"] = 0.5
    app_args["default_steps"] = 4
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    exe = Path(sys.executable).parent
    cmd = [str(exe / "diffray"), "serve", str(path)] if launcher == "diffray" else [str(exe / "serve"), "run", str(path)]
    env = {**_env(), "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", tmp_path / "adapters")
    try:
        def alive() -> None:
            assert proc.poll() is None, proc.stdout.read()

        wait_until(lambda: server.call("GET", "/v1/models", key=None, timeout=5)[0] == 200,
                   f"{launcher} to answer /v1/models", timeout=240, interval=2, alive=alive)
        status, js, _ = server.call("POST", "/v1/images/generations", {"prompt": "a red circle"}, key=None)
        assert status == 200 and png_array(js["data"][0]["b64_json"]).shape == (64, 64, 3)
    finally:
        interrupt_group(proc)
