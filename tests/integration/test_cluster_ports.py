"""What a Ray cluster started by diffray listens on (issue: "local clusters bind Ray's ports on all
interfaces"). diffray's own listeners (the dashboard it turns on) are loopback only; Ray 2.60's core
processes (GCS, raylet, workers, agents) bind the wildcard address whatever `_node_ip_address` says
(Ray resolves 127.0.0.1 to the node's address), so those are listed, bounded to Ray's own processes,
and left to Ray's token auth, which diffray keeps on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SCRIPT = """
import json, os, psutil
from diffray.cluster import connect_ray
connect_ray()
import ray
pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
socks = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in psutil.net_connections("inet")
         if c.status == psutil.CONN_LISTEN and c.pid in pids]
dash = ray._private.worker.global_worker.node.address_info.get("webui_url")
print(json.dumps({"socks": socks, "dashboard": dash}))
ray.shutdown()
"""
LOOPBACK = ("127.0.0.1", "::1")
RAY_CORE = ("gcs_server", "raylet", "python")  # python: the driver's core worker


def test_a_local_cluster_listens_beyond_loopback_only_in_rays_core_processes():
    env = {"RAY_ADDRESS": ""}  # a cluster of its own, as `diffray train` starts without one
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    socks = [tuple(s) for s in report["socks"]]
    assert socks, "the cluster's listening sockets are visible"
    dash_port = int(str(report["dashboard"]).rsplit(":", 1)[1])
    assert {ip for ip, port, _ in socks if port == dash_port} == {"127.0.0.1"}
    beyond = sorted({name for ip, _, name in socks if ip not in LOOPBACK})
    assert all(n in RAY_CORE or n.startswith("ray::") for n in beyond), beyond
