"""Serve's autoscaling of the Generator, driven over HTTP on 127.0.0.1 by the load ramp of
benchmarks/serve_autoscale.py (the benchmark's own code, at a small size): replicas go up under load and back
to the minimum after it with no 5xx and every request answered, a Generator scaled to zero starts a replica
for the first request, `GET /v1/status` reports the replicas and what each holds, and the replica count
changes are logged as `diffray serve` logs them."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import serve_autoscale as bench  # noqa: E402
from serve_helpers import Server  # noqa: E402
from testkit.net import free_port  # noqa: E402
from testkit.wait import wait_until  # noqa: E402


@pytest.fixture(scope="module")
def serve_port(ray_cluster):
    from ray import serve

    yield free_port()
    serve.shutdown()


def get_status(url: str) -> dict:
    status, js, _ = Server(url, Path()).call("GET", "/v1/status", key=bench.KEY, timeout=30)
    assert status == 200, js
    return js


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_replicas_follow_a_load_ramp_up_and_back_down(serve_port, tmp_path):
    from ray import serve

    from diffray.serve.replicas import log_replica_changes

    url = bench.deploy("ramp", bench.app_args(tmp_path, bench.autoscaling(1, 3), steps=2), serve_port)
    logger, said = logging.getLogger("diffray.serve.replicas"), Lines()  # what `diffray serve` logs meanwhile
    logger.addHandler(said)
    logger.setLevel(logging.INFO)
    stop = threading.Event()
    watcher = threading.Thread(target=log_replica_changes, args=("ramp", stop, 0.2), daemon=True)
    try:
        before = get_status(url)
        watcher.start()
        result = bench.ramp(url, "ramp", clients=6, max_replicas=3, min_replicas=1, hold_s=120, down_s=120)
        after = get_status(url)
        wait_until(lambda: said.lines[-1] == "Generator replicas: 1 running", "the log to say 1 replica again")
    finally:
        stop.set()
        watcher.join()
        logger.removeHandler(said)
        serve.delete("ramp")
    assert said.lines[0] == "Generator replicas: 1 running" and "Generator replicas: 3 running" in said.lines
    assert any("starting" in line for line in said.lines) and any("stopping" in line for line in said.lines), \
        said.lines
    assert result["max_running"] == 3 and result["up_to_max_s"] is not None, result["points"][-20:]
    assert result["down_to_min_s"] is not None, result["points"][-20:]
    assert set(result["codes"]) == {"200"}, result["codes"]  # no 5xx, no refused connection: all answered
    assert result["during_scale_down"], "requests were in flight while replicas drained"
    replicas = {r[3] for r in result["requests"]}
    assert len(replicas) >= 2, "the new replicas served requests"
    bench.plot(result, tmp_path / "ramp.png")
    assert (tmp_path / "ramp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # /v1/status: one running replica before and after, the one that answered; no request left in flight
    assert before["generator"]["running"] == 1 and len(before["replicas"]) == 1 and before["in_flight"] == 0
    assert after["generator"]["running"] == 1 and after["in_flight"] == 0, after
    (last,) = after["replicas"]
    assert last["id"] in replicas and last["answered"] >= 1 and last["resident_adapters"] == [], last


@pytest.mark.eval  # CI: the load-ramp test above scales the same Generator up and down
def test_a_generator_scaled_to_zero_starts_a_replica_for_the_first_request(serve_port, tmp_path):
    from ray import serve

    auto = bench.autoscaling(0, 1, initial_replicas=0, downscale_to_zero_delay_s=2)
    url = bench.deploy("zero", bench.app_args(tmp_path, auto, steps=2), serve_port)
    try:
        idle = get_status(url)
        result = bench.scale_to_zero(url, "zero", down_s=120)
    finally:
        serve.delete("zero")
    assert idle["generator"]["running"] == 0 and idle["replicas"] == [], idle
    assert result["idle_at_start"] and result["status"] == 200 and result["replica"], result
    assert result["max_running"] == 1 and result["back_to_zero_s"] is not None, result["points"][-20:]
