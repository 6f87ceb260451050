"""What a request costs at Serve's edge before any model runs, side by side in one run (127.0.0.1 only):

1. `serve_bare`: a Serve deployment whose `__call__` answers "ok": the proxy and its one actor call to the
   replica, Serve's floor on this machine;
2. `fastapi_get`: a FastAPI ingress deployment, a GET route answering JSON;
3. `fastapi_post`: the same app, a POST of a 30-byte JSON body: in the replica each ASGI `receive()` is an
   actor call back to the proxy (`ray.serve._private.http_util.ASGIReceiveProxy`), so reading a body costs
   one more round trip;
4. `diffray_get`: diffray's Ingress (`diffray.serve.app:build_app` on the tiny model), `GET /healthz`: its edge
   middleware (auth, body cap) and error handlers around the same FastAPI.

One keep-alive HTTP connection, requests one at a time, the four interleaved in `--rounds` rounds of
`--requests` each; prints the p50 and p90 of each in ms and writes benchmarks/results/serve_edge.json.

    .venv/bin/python benchmarks/serve_edge.py          # --requests 100 --rounds 5
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' helpers (testkit): ports
from testkit.net import free_port  # noqa: E402

from common import pct  # noqa: E402  (benchmarks/common.py: the script's folder is on sys.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100, help="requests per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_edge.json"))
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from fastapi import FastAPI
    from ray import serve

    from diffray.serve.app import build_app

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    class Bare:
        async def __call__(self, request) -> str:
            return "ok"

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(api)
    class Plain:
        @api.get("/get")
        async def get(self) -> dict:
            return {"status": "ok"}

        @api.post("/post")
        async def post(self, body: dict) -> dict:
            return {"status": "ok"}

    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    reg = tempfile.mkdtemp(prefix="diffray-bench-adapters-")
    atexit.register(shutil.rmtree, reg, ignore_errors=True)
    serve.run(Bare.bind(), name="bare", route_prefix="/bare")
    serve.run(Plain.bind(), name="plain", route_prefix="/plain")
    serve.run(build_app({"model": "builtin:tiny", "adapters_dir": reg,
                         "generator": {"num_replicas": 1, "num_cpus": 0.5, "torch_threads": 1},
                         "ingress": {"num_cpus": 0.25}}), name="diffray", route_prefix="/diffray")

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({"prompt": "a red circle", "n": 1}).encode()
    variants = {"serve_bare": ("GET", "/bare", None), "fastapi_get": ("GET", "/plain/get", None),
                "fastapi_post": ("POST", "/plain/post", body), "diffray_get": ("GET", "/diffray/healthz", None)}

    def once(method: str, path: str, data: bytes | None) -> float:
        t0 = time.perf_counter()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
        r = conn.getresponse()
        r.read()
        assert r.status == 200, (path, r.status)
        return time.perf_counter() - t0

    for spec in variants.values():  # warm-up: routes known to the proxy, connections open
        for _ in range(20):
            once(*spec)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            times[name] += [once(*variants[name]) for _ in range(args.requests)]
    serve.shutdown()
    ray.shutdown()

    res = {"machine": f"{os.cpu_count()} CPUs, ray {ray.__version__}", "date": time.strftime("%Y-%m-%d"),
           "settings": vars(args),
           "ms": {k: {"p50": pct(v, 50) * 1e3, "p90": pct(v, 90) * 1e3, "mean": statistics.mean(v) * 1e3, "n": len(v)}
                  for k, v in times.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print("| request | p50 (ms) | p90 (ms) |\n|---|---|---|")
    for k, v in res["ms"].items():
        print(f"| {k} | {v['p50']:.2f} | {v['p90']:.2f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
