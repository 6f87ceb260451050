"""Serve autoscaling under a load ramp, on this machine's local cluster (127.0.0.1 only):

1. **ramp**: HTTP clients join one per `--ramp-every` seconds up to `--clients`, each sending /v1/generate
   back to back, and hold until the Generator runs `max_replicas` replicas (or `--hold` seconds pass);
2. **tail**: all clients but one stop; that one keeps sending while the replicas come back down to
   `min_replicas`, so requests are in flight while replicas drain;
3. **scale to zero** (a second app, `min_replicas: 0`): one request to a Generator with no replica waits for
   one to start, then the replica goes again after `downscale_to_zero_delay_s`.

Replicas are sampled from Serve's controller (`serve.status()`) every 0.2 s. Prints the delays (load start to
2 replicas and to the maximum; load end to the minimum; cold-start latency) and the status codes, writes
benchmarks/results/serve_autoscale.json and the plot benchmarks/results/serve_autoscale.png.

    .venv/bin/python benchmarks/serve_autoscale.py          # --clients 8 --max-replicas 3

tests/e2e/test_serve_autoscale.py runs `ramp` and `scale_to_zero` at a small size on the test cluster and
asserts on the timeline they return.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' helpers (testkit): ports
from testkit.net import free_port  # noqa: E402

KEY = "bench-key"


def autoscaling(min_replicas: int, max_replicas: int, **overrides) -> dict:
    """The Generator's `autoscaling` args for a quick reaction on a small machine: one ongoing request per
    replica, decisions on a 2 s window reported every 0.5 s, 0.5 s up / 2 s down delays."""
    return {"min_replicas": min_replicas, "max_replicas": max_replicas, "target_ongoing_requests": 1,
            "upscale_delay_s": 0.5, "downscale_delay_s": 2, "look_back_period_s": 2, "metrics_interval_s": 0.5,
            **overrides}


def app_args(workdir: Path, auto: dict, steps: int = 4) -> dict:
    """A small diffray app: the tiny random model at 64 px, half-CPU Generator replicas scaled by `auto`."""
    return {"model": "builtin:tiny-random", "adapters_dir": str(workdir / "adapters"), "default_steps": steps,
            "controlnets": {}, "auth": {"api_keys": [KEY]},
            "limits": {"max_side": 64, "max_n": 1, "max_steps": 8, "request_timeout_s": 120},
            "generator": {"num_cpus": 0.5, "torch_threads": 1, "max_ongoing_requests": 2,
                          "max_queued_requests": -1, "autoscaling": auto},
            "batching": {"enabled": False}, "ingress": {"num_cpus": 0.25},
            "feedback": {"enabled": False, "path": str(workdir / "feedback.db")}}


def deploy(name: str, args: dict, port: int) -> str:
    """Run the app `name` on Serve (started on 127.0.0.1:`port` unless it runs already); its URL."""
    from ray import serve

    from diffray.serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}"


class Sampler(threading.Thread):
    """Every `every_s`: (seconds since start, running replicas, replicas in every state) of the app's Generator."""

    def __init__(self, app: str, t0: float, every_s: float = 0.2):
        super().__init__(daemon=True)
        self.app, self.t0, self.every_s = app, t0, every_s
        self.points: list[tuple[float, int, int]] = []
        self.stop = threading.Event()
        self.changed = threading.Condition()

    def run(self) -> None:
        from diffray.serve.replicas import generator_replicas

        from ray.exceptions import RayError

        while not self.stop.is_set():
            try:
                dep, _ = generator_replicas(self.app)
            except RayError:  # the controller busy or restarting: the next sample
                self.stop.wait(self.every_s)
                continue
            with self.changed:
                self.points.append((time.monotonic() - self.t0, dep["running"], sum(dep["replicas"].values())))
                self.changed.notify_all()
            self.stop.wait(self.every_s)

    def wait_for(self, test, timeout: float) -> float | None:
        """Block until `test(running, total)` holds for a new sample; its time (None after `timeout` s)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            seen = len(self.points)
            while time.monotonic() < deadline:
                for t, running, total in self.points[seen:]:
                    if test(running, total):
                        return t
                seen = len(self.points)
                self.changed.wait(deadline - time.monotonic())
        return None


def post(url: str, body: dict, timeout: float = 180) -> tuple[int, str]:
    """(HTTP status, the answering replica or "") of one POST; a refused connection is status 0."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status, r.headers.get("X-Diffray-Replica", "")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


class Client(threading.Thread):
    """Sends /v1/generate back to back until stopped; records (start s, end s, status, replica) per request."""

    def __init__(self, url: str, t0: float, seed: int):
        super().__init__(daemon=True)
        self.url, self.t0, self.seed = url, t0, seed
        self.stop = threading.Event()
        self.requests: list[tuple[float, float, int, str]] = []

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic() - self.t0
            status, replica = post(self.url + "/v1/generate", {"prompt": "a red circle", "seed": self.seed})
            self.requests.append((start, time.monotonic() - self.t0, status, replica))


def ramp(url: str, app: str, clients: int, max_replicas: int, min_replicas: int, ramp_every_s: float = 1.0,
         hold_s: float = 90.0, down_s: float = 120.0) -> dict:
    """The load ramp and tail against a deployed app; the timeline and its figures (see the module doc)."""
    t0 = time.monotonic()
    sampler = Sampler(app, t0)
    sampler.start()
    running: list[Client] = []
    load = [(0.0, 0)]
    try:
        sampler.wait_for(lambda r, total: r == min_replicas and total == min_replicas, 60)
        load_start = time.monotonic() - t0
        for i in range(clients):
            running.append(Client(url, t0, i))
            running[-1].start()
            load.append((time.monotonic() - t0, len(running)))
            if sampler.wait_for(lambda r, _: r >= max_replicas, ramp_every_s) is not None:
                break
        at_max = sampler.wait_for(lambda r, _: r >= max_replicas, hold_s)
        for c in running[1:]:  # the tail: one client keeps sending while replicas drain
            c.stop.set()
        tail_start = time.monotonic() - t0
        load.append((tail_start, 1))
        at_min = sampler.wait_for(lambda r, total: r == min_replicas and total == min_replicas, down_s)
    finally:
        for c in running:
            c.stop.set()
        for c in running:
            c.join(timeout=200)
        load.append((time.monotonic() - t0, 0))
        sampler.stop.set()
        sampler.join()
    requests = sorted(r for c in running for r in c.requests)
    two = next((t for t, r, _ in sampler.points if r >= 2 and t >= load_start), None)
    asked = next((t for t, _, total in sampler.points if total >= 2 and t >= load_start), None)
    codes: dict[str, int] = {}
    for *_, status, _ in requests:
        codes[str(status)] = codes.get(str(status), 0) + 1
    return {"points": sampler.points, "load": load, "requests": requests, "codes": codes,
            "clients": len(running), "max_running": max(r for _, r, _ in sampler.points),
            "load_start_s": load_start, "tail_start_s": tail_start,
            "second_started_s": None if asked is None else asked - load_start,
            "up_to_2_s": None if two is None else two - load_start,
            "up_to_max_s": None if at_max is None else at_max - load_start,
            "down_to_min_s": None if at_min is None else at_min - tail_start,
            "during_scale_down": [r for r in requests if r[0] >= tail_start]}


def scale_to_zero(url: str, app: str, down_s: float = 120.0) -> dict:
    """One request to a Generator scaled to zero: its status and latency, and the replicas before, during
    and after (the last replica must go again)."""
    t0 = time.monotonic()
    sampler = Sampler(app, t0)
    sampler.start()
    try:
        idle = sampler.wait_for(lambda r, total: total == 0, down_s)
        start = time.monotonic()
        status, replica = post(url + "/v1/generate", {"prompt": "a blue square", "seed": 1})
        latency = time.monotonic() - start
        zero_again = sampler.wait_for(lambda r, total: total == 0, down_s)
    finally:
        sampler.stop.set()
        sampler.join()
    return {"points": sampler.points, "idle_at_start": idle is not None, "status": status, "replica": replica,
            "cold_start_s": latency, "max_running": max(r for _, r, _ in sampler.points),
            "back_to_zero_s": None if zero_again is None else zero_again - (start - t0) - latency}


def plot(result: dict, path: Path) -> None:
    """Replicas (running, all states) and load clients over time; the ramp's start and the tail's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    t, running, total = zip(*result["points"])
    ax.step(t, total, where="post", label="Generator replicas (all states)", color="0.6")
    ax.step(t, running, where="post", label="Generator replicas running", color="C0", linewidth=2)
    lt, ln = zip(*result["load"])
    ax.step(lt, ln, where="post", label="clients sending", color="C1", linestyle="--")
    for x, what in ((result["load_start_s"], "load starts"), (result["tail_start_s"], "one client left")):
        ax.axvline(x, color="0.8", linewidth=0.8)
        ax.annotate(what, (x, ax.get_ylim()[1]), fontsize=7, ha="left", va="top")
    ax.set_xlabel("seconds")
    ax.set_ylabel("count")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="sampler steps per request")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_autoscale.json"))
    args = ap.parse_args()

    from ray import serve

    from diffray import logs
    from diffray.cluster import connect_ray

    logs.configure_cli(False)
    connect_ray()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        url = deploy("ramp", app_args(Path(tmp), autoscaling(1, args.max_replicas), args.steps), port)
        result = ramp(url, "ramp", args.clients, args.max_replicas, 1)
        serve.delete("ramp")
        zero_url = deploy("zero", app_args(Path(tmp), autoscaling(0, 1, initial_replicas=0,
                                                                  downscale_to_zero_delay_s=5), args.steps), port)
        result["scale_to_zero"] = scale_to_zero(zero_url, "zero")
        serve.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    z = result["scale_to_zero"]
    fmt = lambda x: "-" if x is None else f"{x:.1f} s"  # noqa: E731
    print(f"clients {result['clients']}, replicas at most {result['max_running']} (max_replicas {args.max_replicas})")
    print(f"load start -> a 2nd replica starting: {fmt(result['second_started_s'])}; -> 2 running: "
          f"{fmt(result['up_to_2_s'])}; -> {args.max_replicas} running: {fmt(result['up_to_max_s'])}")
    print(f"one client left -> back to 1 replica: {fmt(result['down_to_min_s'])} "
          f"({len(result['during_scale_down'])} requests sent meanwhile)")
    print(f"status codes: {result['codes']}")
    print(f"scale to zero: first request {z['status']} after {fmt(z['cold_start_s'])} (a replica started for it); "
          f"back to 0 replicas {fmt(z['back_to_zero_s'])} after it")
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
