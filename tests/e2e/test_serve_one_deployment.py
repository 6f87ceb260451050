"""`generator.in_ingress`: the app as one deployment, each Ingress replica drawing itself (no actor call to
a Generator), over real HTTP. Two apps share one Serve instance: "one" (the Ingress alone, 1 replica) and
"two" (Ingress -> 1 Generator replica), same model, registry and sampler settings, so the same request
must give the same pixels from both.

Covers: base / n=2 / LoRA / two LoRAs / TI images equal to the two-deployment app's, the Server-Timing
parts, `/v1/status` naming the Ingress's replicas and their resident adapters, the Generator's limits
(503 with Retry-After beyond `max_ongoing_requests` + `max_queued_requests`), a timeout and a client that
goes away each abandoning the generation at the next sampler step, the config error for a setting the
one deployment has no use for, and (a third app of two replicas) Serve's proxy routing a request that names
its adapter set in the `serve_multiplexed_model_id` header to the replica that holds it.
"""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import KEY, Server, adapter_registry, app_args, free_port, server_timing
from testkit.wait import wait_until

from diffray.errors import ConfigError

pytestmark = [pytest.mark.e2e]

ONE, TWO, ROUTED = "diffray-one", "diffray-two", "diffray-routed"
G = "/v1/generate"
LONG = {"prompt": "a long one", "width": 256, "height": 256, "steps": 900, "seed": 1}


@pytest.fixture(scope="module")
def servers(ray_cluster, tiny_model_path, tmp_path_factory):
    from ray import serve

    from diffray.serve.app import build_app

    reg = adapter_registry(tiny_model_path, tmp_path_factory.mktemp("one-adapters"), controlnet=False)
    limits = {"max_side": 256, "max_n": 2, "max_steps": 1000, "request_timeout_s": 3}
    generator = {"num_replicas": 1, "num_cpus": 0.5, "torch_threads": 1, "max_ongoing_requests": 2,
                 "max_queued_requests": 2, "max_adapters_per_replica": 3}
    one = app_args(reg, reg.parent / "fb-one.db", limits=limits, generator={**generator, "in_ingress": True})
    del one["ingress"]
    two = app_args(reg, reg.parent / "fb-two.db", limits=limits, generator=generator)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(one), name=ONE, route_prefix="/one")
    serve.run(build_app(two), name=TWO, route_prefix="/two")
    url = f"http://127.0.0.1:{port}"
    yield Server(url + "/one", reg), Server(url + "/two", reg)
    serve.delete(ONE)
    serve.delete(TWO)
    serve.shutdown()


@pytest.fixture(scope="module")
def routed(servers):
    """A third app on the same Serve instance: one deployment of two replicas."""
    from ray import serve

    from diffray.serve.app import build_app

    one, _ = servers
    args = app_args(one.registry, one.registry.parent / "fb-routed.db",
                    generator={"num_replicas": 2, "num_cpus": 0.5, "torch_threads": 1, "max_ongoing_requests": 2,
                               "max_adapters_per_replica": 3, "in_ingress": True})
    del args["ingress"]
    serve.run(build_app(args), name=ROUTED, route_prefix="/routed")
    yield Server(one.url.removesuffix("/one") + "/routed", one.registry)
    serve.delete(ROUTED)


def _info() -> dict:
    """The one-deployment replica's engine figures (resident adapters, batches, abandoned jobs)."""
    from ray import serve

    return serve.get_deployment_handle("Ingress", app_name=ONE).info.remote().result()


def test_the_app_is_one_deployment_whose_replica_draws(servers):
    from ray import serve

    deployments = serve.status().applications[ONE].deployments
    assert set(deployments) == {"Ingress"}
    assert set(serve.status().applications[TWO].deployments) == {"Ingress", "Generator"}


@pytest.mark.parametrize("body", [
    {"prompt": "a red circle"},
    {"prompt": "a red circle", "n": 2},
    {"prompt": "a red circle", "adapter": "lora-a"},
    {"prompt": "a red circle", "adapters": [{"id": "lora-a", "weight": 1.0}, {"id": "lora-b", "weight": 0.7}]},
    {"prompt": "a photo of <x-tok>", "adapter": "ti-x"},
], ids=["base", "n2", "lora", "two-loras", "ti"])
def test_one_deployment_draws_what_two_do(servers, body):
    one, two = servers
    base, _ = one.generate(prompt=body["prompt"])  # before the adapter is resident (a TI's token then is not)
    got, headers = one.generate(**body)
    want, _ = two.generate(**body)
    assert len(got) == len(want) == body.get("n", 1)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    if "adapter" in body or "adapters" in body:
        assert np.abs(got[0] - base[0]).mean() > 1  # the adapter drew, not the base
    assert headers["x-diffray-replica"] == _info()["replica"]  # drawn by the Ingress replica itself


def test_an_answer_says_where_its_time_went(servers):
    one, _ = servers
    status, js, headers = one.call("POST", G, {"prompt": "a red circle", "steps": 4, "adapter": "lora-a"})
    assert status == 200, js
    t = server_timing(headers["server-timing"])
    assert list(t) == ["ingress", "generator", "adapters", "queue", "engine"]
    # nested, each figure rounded to 0.1 ms (off by up to 0.05 each); with no hop, the replica's parts fill
    # `generator` to within a tenth of a ms, so the rounding is all the slack there is
    assert t["engine"] > 0 and t["adapters"] + t["queue"] + t["engine"] <= t["generator"] + 0.21, t
    assert t["generator"] <= t["ingress"] + 0.11, t


def test_status_lists_the_ingress_replicas_and_what_they_hold(servers):
    one, _ = servers
    one.generate(prompt="hold", adapter="lora-b")
    status, js, _ = one.call("GET", "/v1/status")
    assert status == 200, js
    assert js["generator"]["status"] == "HEALTHY" and js["generator"]["running"] == 1
    (replica,) = js["replicas"]
    assert replica["id"] == _info()["replica"] and "lora-b" in replica["resident_adapters"]
    assert replica["answered"] >= 1


def test_beyond_the_generators_limits_is_503_and_accepted_requests_complete(servers):
    one, _ = servers

    def call(i):
        return one.call("POST", G, {"prompt": "load", "steps": 12, "seed": i})

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    codes = [r[0] for r in results]
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 4, codes
    for status, js, headers in results:
        if status == 503:
            assert js["error"]["type"] == "overloaded" and int(headers["retry-after"]) >= 0
        else:
            assert len(js["images"]) == 1
    assert one.call("GET", "/healthz", key=None)[0] == 200


def _wait_idle(count_before: int) -> dict:
    def freed() -> dict | None:
        info = _info()
        return info if len(info["abandoned"]) > count_before and not info["busy"] else None

    return wait_until(freed, "the replica to abandon the job and free itself", interval=0.1)


def test_a_timed_out_generation_is_abandoned_within_one_step(servers):
    one, _ = servers
    before = len(_info()["abandoned"])
    status, js, _ = one.call("POST", G, LONG)
    assert status == 504 and js["error"]["type"] == "timeout", js
    why, steps = _wait_idle(before)["abandoned"][-1]
    assert why == "cancel" and steps <= 1
    assert one.generate(prompt="next", steps=1)[0][0].shape == (64, 64, 3)


def test_a_client_that_goes_away_cancels_its_generation(servers):
    one, _ = servers
    before = len(_info()["abandoned"])
    host, port = one.url.removeprefix("http://").split("/")[0].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=1.0)
    conn.request("POST", "/one" + G, json.dumps(LONG), {"Authorization": f"Bearer {KEY}",
                                                        "Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()  # gone long before the server's 3 s timeout
    why, steps = _wait_idle(before)["abandoned"][-1]
    assert why == "cancel" and steps <= 1


@pytest.mark.parametrize("ingress, field", [({"num_replicas": 2}, "ingress.num_replicas"),
                                            ({"num_cpus": 1.0}, "ingress.num_cpus")])
def test_an_ingress_setting_the_one_deployment_does_not_use_is_refused(tmp_path, ingress, field):
    from diffray.serve.app import build_app

    with pytest.raises(ConfigError, match=field):
        build_app({"adapters_dir": str(tmp_path), "generator": {"in_ingress": True}, "ingress": ingress})


def test_a_request_naming_its_adapters_in_the_header_goes_to_the_replica_holding_them(routed):
    """With one deployment each replica's adapter sets are its multiplexed models, so Serve's proxy routes on
    the `serve_multiplexed_model_id` header (the adapter ids, sorted, joined by '+') as a handle call to the
    Generator would: a request naming `lora-a` there goes to the replica that loaded `lora-a`."""
    body = {"prompt": "a red circle", "adapter": "lora-a", "steps": 1}

    def answered_by(headers: dict) -> str:
        status, js, h = routed.call("POST", G, body, headers=headers)
        assert status == 200, js
        return h["x-diffray-replica"]

    named = {"serve_multiplexed_model_id": "lora-a"}
    holder = answered_by(named)  # lora-a loads on one of the two replicas
    # that replica reports its models to Serve's controller, which passes them on to the proxy
    wait_until(lambda: all(answered_by(named) == holder for _ in range(4)),
               "the proxy to send requests for lora-a to the replica that holds it", timeout=60)
    assert {answered_by(named) for _ in range(16)} == {holder}  # by chance: 1 in 2**16
    # the header's dash spelling (what HTTP clients that refuse underscores send) routes the same
    assert {answered_by({"serve-multiplexed-model-id": "lora-a"}) for _ in range(8)} == {holder}
