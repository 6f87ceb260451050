"""Serving overheads on the tiny model, side by side in one run:

1. latency p50/p99 of a direct pipeline call (the same `ImageEngine.run` a replica does: pipeline +
   PNG encoding) vs the same request through Serve over HTTP, one at a time, the variants taking turns
   request by request; steps chosen so one generation takes >= 50 ms. Served by the two deployments
   (proxy -> Ingress -> Generator) and by one (`generator.in_ingress`: proxy -> Ingress, which draws), each
   from a client that opens a connection per request (urllib) and from one that keeps its connection open
   (as requests.Session, httpx and the openai SDK do); and, by one deployment, a request for an adapter with
   and without the `serve_multiplexed_model_id` header that routes it to the replica holding that adapter
   (what the header costs the proxy; an app of its own);
2. throughput at concurrency 8 with dynamic batching on vs off (two apps, one Generator replica each,
   rounds interleaved);
3. switching to a resident adapter (`set_adapters`) vs one generation vs reloading the pipeline;
4. requests for `--adapters` distinct LoRAs at concurrency 8: mixed-adapter batching (one pipeline call,
   each row its own LoRA: `diffray.serve.mixing`) vs one call per adapter, as throughput through Serve (two apps, batching on
   in both) and as `ImageEngine.run` of one such batch directly, with every image checked against the
   image the job gets alone;
5. where a served request's time goes (the latency requests' own Server-Timing headers: HTTP and proxy,
   the Ingress, the hop to the Generator, its queue, its engine call), beside an HTTP round trip to a route
   that does nothing (`/healthz`) and the direct call.

    .venv/bin/python benchmarks/serve.py            # --requests 60 --rounds 3 --steps 10

Prints a table with the ratios and writes benchmarks/results/serve.json.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' helpers (testkit): ports, untrained adapters
from testkit.net import free_port  # noqa: E402

from common import pct  # noqa: E402  (benchmarks/common.py: the script's folder is on sys.path)


def post(url: str, body: dict) -> float:
    return post_timed(url, body)[0]


def post_timed(url: str, body: dict, headers: dict | None = None) -> tuple[float, dict[str, float]]:
    """Seconds until the whole answer was read, and the answer's Server-Timing parts (seconds)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
        assert r.status == 200
        timing = r.headers.get("Server-Timing", "")
    return time.perf_counter() - t0, timing_parts(timing)


def timing_parts(header: str) -> dict[str, float]:
    """{name: seconds} of a Server-Timing header (`name;dur=12.3, ...`, in ms)."""
    parts = (p.strip().partition(";dur=") for p in header.split(",") if p.strip())
    return {name: float(dur) / 1e3 for name, _, dur in parts}


class KeepAlive:
    """A client that keeps one HTTP/1.1 connection open across requests (`post_timed`'s answer)."""

    def __init__(self, base: str):
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(base)
        self.conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)

    def post_timed(self, path: str, body: dict) -> tuple[float, dict[str, float]]:
        data = json.dumps(body).encode()
        t0 = time.perf_counter()
        self.conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        r = self.conn.getresponse()
        r.read()
        assert r.status == 200
        return time.perf_counter() - t0, timing_parts(r.headers.get("Server-Timing", ""))


def get(url: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        r.read()
    return time.perf_counter() - t0


def decompose(direct: list[float], served: list[tuple[float, dict]], healthz: list[float]) -> dict:
    """Median ms of where a served request's time went, each part from the same requests' Server-Timing:
    HTTP and the proxy (the client's wait less the Ingress handler), the Ingress's own work, the hop to the
    Generator and back, the replica's queue and adapter lookup, and its engine call; beside them a direct
    call in this process and an HTTP round trip to a route that does nothing (`/healthz`)."""
    def med(xs):
        return statistics.median(xs) * 1e3

    return {"direct_engine": med(direct), "replica_engine": med([t["engine"] for _, t in served]),
            "replica_queue_and_adapters": med([t["queue"] + t["adapters"] for _, t in served]),
            "generator_hop": med([t["generator"] - t["engine"] - t["queue"] - t["adapters"] for _, t in served]),
            "ingress_own": med([t["ingress"] - t["generator"] for _, t in served]),
            "http_and_proxy": med([w - t["ingress"] for w, t in served]),
            "served_total": med([w for w, _ in served]), "healthz_round_trip": med(healthz)}


def app_args(reg: str, steps: int, threads: int, batching: bool, mix: bool = True, adapters: int = 4,
             one: bool = False) -> dict:
    """One Generator replica (or, `one`, one Ingress replica drawing itself: `generator.in_ingress`)."""
    return {"model": "builtin:tiny", "adapters_dir": reg, "default_steps": steps,
            "generator": {"num_replicas": 1, "num_cpus": 0.5, "torch_threads": threads, "max_ongoing_requests": 8,
                          "max_queued_requests": -1, "max_adapters_per_replica": max(4, adapters), "in_ingress": one},
            "batching": {"enabled": batching, "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "mix_adapters": mix},
            **({} if one else {"ingress": {"num_cpus": 0.25}})}


def throughput(url: str, body: dict, concurrency: int, total: int, adapters: list[str] | None = None) -> float:
    """Requests per second with `concurrency` clients sending `total` requests in all; with `adapters`,
    client i always asks for adapters[i % len(adapters)]."""
    counter, lock = [0], threading.Lock()

    def client(i: int):
        while True:
            with lock:
                if counter[0] >= total:
                    return
                counter[0] += 1
                seed = counter[0]
            post(url, {**body, "seed": seed, **({"adapter": adapters[i % len(adapters)]} if adapters else {})})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return total / (time.perf_counter() - t0)


def adapter_switch(engine, job_cls, steps: int, repeats: int) -> dict:
    """Median seconds: switching between two resident LoRAs, one generation, reloading the pipeline."""
    from diffray.models.loading import load_pipeline

    engine.acquire(["lora-a"])
    engine.acquire(["lora-b"])
    switch = []
    for i in range(repeats):
        t0 = time.perf_counter()
        engine.activate(((("lora-a", "lora-b")[i % 2], 1.0),))
        switch.append(time.perf_counter() - t0)
    job = job_cls(prompt="a red circle", n=1, width=64, height=64, steps=steps, guidance=7.5, seed=0,
                  adapters=(("lora-a", 1.0),))
    gen = []
    for _ in range(max(5, repeats // 4)):
        t0 = time.perf_counter()
        engine.run([job])
        gen.append(time.perf_counter() - t0)
    reload = []
    for _ in range(3):
        t0 = time.perf_counter()
        load_pipeline(engine.model_path)
        reload.append(time.perf_counter() - t0)
    return {"switch": statistics.median(switch), "generation": statistics.median(gen),
            "reload_pipeline": statistics.median(reload)}


def mixed_engine(engine, job_cls, names: list[str], steps: int, rounds: int) -> dict:
    """One batch of jobs, one per adapter in `names`, through `ImageEngine.run` with mixed-adapter batching
    on and off (interleaved, median seconds), and the largest pixel difference from each job run alone."""
    import io

    import numpy as np
    from PIL import Image

    def px(png: bytes):
        return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)

    jobs = [job_cls(prompt="a red circle", n=1, width=64, height=64, steps=steps, guidance=7.5, seed=i,
                    adapters=((name, 1.0),)) for i, name in enumerate(names)]
    engine.acquire(names)
    alone = [px(engine.run([j])[0][0]) for j in jobs]
    times: dict[bool, list[float]] = {True: [], False: []}
    diff = 0
    for r in range(rounds):
        for mix in ((True, False) if r % 2 == 0 else (False, True)):
            engine.args.batching.mix_adapters = mix
            t0 = time.perf_counter()
            out = engine.run(jobs)
            times[mix].append(time.perf_counter() - t0)
            assert engine.batch_log[-1] == (len(jobs), 1 if mix else len(jobs)), engine.batch_log[-1]
            diff = max(diff, max(int(np.abs(px(o[0]) - a).max()) for o, a in zip(out, alone)))
    engine.args.batching.mix_adapters = True
    engine.release(names)
    return {"mixed_s": statistics.median(times[True]), "per_adapter_s": statistics.median(times[False]),
            "max_pixel_diff_vs_alone": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=60, help="sequential requests per variant per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="sampler steps (a generation should take >= 50 ms)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, driver and replicas alike")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--throughput-requests", type=int, default=48)
    ap.add_argument("--adapters", type=int, default=8, help="distinct LoRAs for the mixed-adapter part")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve.json"))
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    import torch
    from ray import serve

    from diffray.models.loading import resolve_model_path
    from diffray.serve.app import build_app
    from diffray.serve.config import parse_args
    from testkit.adapters import random_lora
    from diffray.serve.engine import ImageEngine
    from diffray.serve.schemas import Job

    torch.set_num_threads(args.threads)
    model = resolve_model_path("builtin:tiny")
    reg = tempfile.mkdtemp(prefix="diffray-bench-adapters-")
    atexit.register(shutil.rmtree, reg, ignore_errors=True)  # nothing left in /tmp
    random_lora(model, Path(reg) / "lora-a", seed=1)
    random_lora(model, Path(reg) / "lora-b", seed=2)
    mixed_ids = [f"mix-{i}" for i in range(args.adapters)]
    for i, name in enumerate(mixed_ids):
        random_lora(model, Path(reg) / name, seed=10 + i)

    engine = ImageEngine(parse_args({"model": model, "adapters_dir": reg}), device="cpu")
    body = {"prompt": "a red circle", "steps": args.steps, "seed": 0}
    job = Job(prompt=body["prompt"], n=1, width=64, height=64, steps=args.steps, guidance=7.5, seed=0)
    adapter_body = {**body, "adapter": "lora-a"}
    routed = {"serve_multiplexed_model_id": "lora-a"}  # the adapter set's id: its ids sorted, joined by "+"
    for _ in range(3):
        engine.run([job])  # warm-up

    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    serve.run(build_app(app_args(reg, args.steps, args.threads, True)), name="on", route_prefix="/on")
    serve.run(build_app(app_args(reg, args.steps, args.threads, False)), name="off", route_prefix="/off")
    serve.run(build_app(app_args(reg, args.steps, args.threads, False, one=True)), name="one", route_prefix="/one")
    # the header's pair on an app of its own, so the adapter resident there does not touch `one`'s base requests
    serve.run(build_app(app_args(reg, args.steps, args.threads, False, one=True)), name="hdr", route_prefix="/hdr")
    for name, mix in (("mix", True), ("sep", False)):  # batching on in both: mixed-adapter batching on / off
        serve.run(build_app(app_args(reg, args.steps, args.threads, True, mix, args.adapters)), name=name,
                  route_prefix=f"/{name}")
    base = f"http://127.0.0.1:{port}"
    for prefix in ("/on", "/off", "/one"):
        for _ in range(3):
            post(f"{base}{prefix}/v1/generate", body)
    for _ in range(3):
        post_timed(f"{base}/hdr/v1/generate", adapter_body, routed)  # lora-a resident
    keep = KeepAlive(base)
    for prefix in ("/mix", "/sep"):  # every adapter resident before anything is timed
        for name in mixed_ids:
            post(f"{base}{prefix}/v1/generate", {**body, "adapter": name})

    direct, timed, healthz, tput = [], [], [], {"on": [], "off": [], "mix": [], "sep": []}
    # the latency variants' (wall, timing); `one_adapter` and `one_header` ask for lora-a, the second naming it in
    # the multiplex header as well (each against the other: the body's adapter costs the same in both)
    lats = {"two_new": [], "two_keep": [], "one_new": [], "one_keep": [], "one_adapter": [], "one_header": []}
    order = ("direct", "two_new", "one_new", "two_keep", "one_keep", "one_adapter", "one_header")
    for r in range(args.rounds):
        # the latency variants take turns request by request, each turn starting one variant later: this VM's
        # speed drifts by 10-20% within seconds (BENCHMARKS.md), so blocks of one variant at a time compared
        # different speeds
        for i in range(args.requests):
            k = (r * args.requests + i) % len(order)
            for variant in order[k:] + order[:k]:
                if variant == "direct":
                    t0 = time.perf_counter()
                    engine.run([job])
                    direct.append(time.perf_counter() - t0)
                    continue
                path = f"/{'off' if variant.startswith('two') else 'one'}/v1/generate"
                if variant.endswith("keep"):
                    lats[variant].append(keep.post_timed(path, body))
                elif variant in ("one_adapter", "one_header"):
                    lats[variant].append(post_timed(f"{base}/hdr/v1/generate", adapter_body,
                                                    routed if variant == "one_header" else None))
                else:
                    lats[variant].append(post_timed(base + path, body))
        timed = lats["two_new"]
        healthz += [get(f"{base}/off/healthz") for _ in range(args.requests)]
        served = [w for w, _ in timed]
        for variant in (("on", "off") if r % 2 == 0 else ("off", "on")):
            tput[variant].append(throughput(f"{base}/{variant}/v1/generate", body, args.concurrency,
                                            args.throughput_requests))
        for variant in (("mix", "sep") if r % 2 == 0 else ("sep", "mix")):
            tput[variant].append(throughput(f"{base}/{variant}/v1/generate", body, args.concurrency,
                                            args.throughput_requests, mixed_ids))
        print(f"round {r + 1}/{args.rounds}: direct p50 {pct(direct, 50) * 1e3:.1f} ms, serve p50 "
              f"{pct(served, 50) * 1e3:.1f} ms, batching on {tput['on'][-1]:.1f} rps, off {tput['off'][-1]:.1f} rps, "
              f"{args.adapters} adapters mixed {tput['mix'][-1]:.1f} rps, per adapter {tput['sep'][-1]:.1f} rps",
              flush=True)
    serve.shutdown()
    ray.shutdown()
    switch = adapter_switch(engine, Job, args.steps, 40)
    mixed = mixed_engine(engine, Job, mixed_ids, args.steps, max(3, args.rounds))

    res = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, ray {ray.__version__}",
        "date": time.strftime("%Y-%m-%d"), "settings": vars(args),
        "latency_ms": {"direct_p50": pct(direct, 50) * 1e3, "direct_p99": pct(direct, 99) * 1e3,
                       "serve_p50": pct(served, 50) * 1e3, "serve_p99": pct(served, 99) * 1e3,
                       **{f"{v}_p{q}": pct([w for w, _ in xs], q) * 1e3 for v, xs in lats.items() for q in (50, 99)},
                       # what Serve adds to its replica's own pipeline call (the client's wait - `engine`, per
                       # request): free of the replica process's own speed, which differs from this one's
                       **{f"{v}_added_p50": statistics.median(w - t["engine"] for w, t in xs) * 1e3
                          for v, xs in lats.items()}},
        "throughput_rps": {"batching_on": statistics.median(tput["on"]), "batching_off": statistics.median(tput["off"]),
                           "rounds_on": tput["on"], "rounds_off": tput["off"]},
        "serve_parts_ms_p50": decompose(direct, timed, healthz),
        "one_deployment_parts_ms_p50": decompose(direct, lats["one_new"], healthz),
        "adapter_switch_ms": {k: v * 1e3 for k, v in switch.items()},
        "mixed_adapters": {"adapters": args.adapters, "serve_rps_mixed": statistics.median(tput["mix"]),
                           "serve_rps_per_adapter": statistics.median(tput["sep"]), "rounds_mixed": tput["mix"],
                           "rounds_per_adapter": tput["sep"], **mixed},
    }
    mx = res["mixed_adapters"]
    lat, tp, sw = res["latency_ms"], res["throughput_rps"], res["adapter_switch_ms"]
    res["ratios"] = {
        "serve_over_direct_p50": lat["serve_p50"] / lat["direct_p50"],
        "serve_over_direct_p99": lat["serve_p99"] / lat["direct_p99"],
        **{f"{v}_over_direct_p50": lat[f"{v}_p50"] / lat["direct_p50"] for v in ("two_new", "two_keep", "one_new",
                                                                                  "one_keep")},
        **{f"{v}_added_over_direct_p50": 1 + lat[f"{v}_added_p50"] / lat["direct_p50"]
           for v in ("two_new", "two_keep", "one_new", "one_keep")},
        "batching_on_over_off": tp["batching_on"] / tp["batching_off"],
        "switch_over_generation": sw["switch"] / sw["generation"],
        "reload_over_switch": sw["reload_pipeline"] / sw["switch"],
        "header_over_no_header_p50": lat["one_header_p50"] / lat["one_adapter_p50"],
        "mixed_over_per_adapter_serve": mx["serve_rps_mixed"] / mx["serve_rps_per_adapter"],
        "mixed_over_per_adapter_engine": mx["per_adapter_s"] / mx["mixed_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"\n| measure | value | target |\n|---|---|---|\n"
          f"| direct p50 / p99 (ms) | {lat['direct_p50']:.1f} / {lat['direct_p99']:.1f} | generation >= 50 ms |\n"
          f"| Serve p50 / p99 (ms) | {lat['serve_p50']:.1f} / {lat['serve_p99']:.1f} | |\n"
          f"| Serve / direct p50, p99 | {res['ratios']['serve_over_direct_p50']:.3f}, "
          f"{res['ratios']['serve_over_direct_p99']:.3f} | <= 1.10 |\n"
          + "".join(f"| {label}: p50 (ms), / direct; Serve's part (ms), (direct + it) / direct | {lat[v + '_p50']:.1f}, "
                    f"{res['ratios'][v + '_over_direct_p50']:.3f}; {lat[v + '_added_p50']:.1f}, "
                    f"{res['ratios'][v + '_added_over_direct_p50']:.3f} | <= 1.10 |\n" for v, label in (
                        ("two_new", "two deployments, a connection per request"),
                        ("two_keep", "two deployments, kept connection"),
                        ("one_new", "one deployment, a connection per request"),
                        ("one_keep", "one deployment, kept connection"))) +
          f"| one deployment, adapter lora-a: p50 (ms) with / without the multiplex header | "
          f"{lat['one_header_p50']:.1f} / {lat['one_adapter_p50']:.1f} = "
          f"{res['ratios']['header_over_no_header_p50']:.3f} | |\n"
          f"| throughput @{args.concurrency} batching on / off (req/s) | {tp['batching_on']:.2f} / "
          f"{tp['batching_off']:.2f} = {res['ratios']['batching_on_over_off']:.2f}x | >= 1.5x |\n"
          f"| adapter switch / generation / pipeline reload (ms) | {sw['switch']:.2f} / {sw['generation']:.1f} / "
          f"{sw['reload_pipeline']:.0f} | |\n"
          f"| switch / generation | {res['ratios']['switch_over_generation']:.3%} | <= 5% |\n"
          f"| reload / switch | {res['ratios']['reload_over_switch']:.0f}x | >= 10x |\n"
          f"| {args.adapters} adapters @{args.concurrency}, Serve: mixed / per-adapter batching (req/s) | "
          f"{mx['serve_rps_mixed']:.2f} / {mx['serve_rps_per_adapter']:.2f} = "
          f"{res['ratios']['mixed_over_per_adapter_serve']:.2f}x | >= 1.5x |\n"
          f"| {args.adapters} adapters, one `ImageEngine.run`: per-adapter / mixed (ms) | "
          f"{mx['per_adapter_s'] * 1e3:.0f} / {mx['mixed_s'] * 1e3:.0f} = "
          f"{res['ratios']['mixed_over_per_adapter_engine']:.2f}x | |\n"
          f"| largest pixel difference, mixed vs each job alone | {mx['max_pixel_diff_vs_alone']} | <= 1 |\n"
          f"\nWhere a served request's time went (p50 ms, from its Server-Timing header):\n\n| part | ms |\n|---|---|\n"
          + "".join(f"| {k} | {v:.1f} |\n" for k, v in res["serve_parts_ms_p50"].items()) +
          "\nThe same with one deployment (`generator.in_ingress`; `generator_hop` is then the in-process call):\n\n"
          "| part | ms |\n|---|---|\n"
          + "".join(f"| {k} | {v:.1f} |\n" for k, v in res["one_deployment_parts_ms_p50"].items()) +
          f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
