"""A Ray cluster of `ray start` processes on this machine, driven as a real one is: token authentication
on, the job server and dashboard on 127.0.0.1, its own temp dir, ports and token file. Teardown stops
only the process sessions it started (never a bare `ray stop`, which would stop other local clusters).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from testkit.net import free_ports
from testkit.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


class LocalCluster:
    """Head + one worker node, each `ray start --block` in its own process session (`start_nodes`)."""

    def __init__(self, root: Path):
        self.root = root
        gcs, dash, client, agent1, agent2 = free_ports(5)
        self.gcs, self.dashboard = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        self.token = secrets.token_hex(32)
        token_file = root / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        # The workers and job drivers inherit this: the venv's python and `diffray` on PATH, token auth on.
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                    "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"}
        self.ports = {"gcs": gcs, "dash": dash, "client": client, "agent1": agent1, "agent2": agent2}
        self.procs: list[subprocess.Popen] = []
        self.cwd = REPO  # of every `ray start`: the nodes' processes (and jobs without a working dir) run there

    def start_nodes(self) -> None:
        p = self.ports
        common = ["--block", "--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        self.procs.append(self.start("head", ["--head", f"--port={p['gcs']}", "--include-dashboard=true",
                                              "--dashboard-host=127.0.0.1", f"--dashboard-port={p['dash']}",
                                              f"--ray-client-server-port={p['client']}",
                                              f"--dashboard-agent-listen-port={p['agent1']}", *common]))
        self.wait_for(lambda: self.request("/api/version") is not None, "the head's job server")
        self.procs.append(self.start("node2", [f"--address={self.gcs}", '--resources={"node2": 1}',
                                               f"--dashboard-agent-listen-port={p['agent2']}", *common]))
        self.wait_for(lambda: len(self.alive_nodes()) == 2, "the second node")

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        return subprocess.Popen([RAY, "start", f"--temp-dir={self.root / name}", *args], env=self.env, cwd=self.cwd,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for(self, ready, what: str, timeout: float = 90) -> None:
        def alive() -> None:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a node died before {what} came up:\n{self.logs()}")

        try:
            wait_until(ready, what, timeout=timeout, interval=0.5, alive=alive)
        except AssertionError as exc:
            raise RuntimeError(f"{exc}:\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in self.root.glob("*.log"))

    def request(self, path: str, token: bool = True):
        req = urllib.request.Request(self.dashboard + path,
                                     headers={"Authorization": f"Bearer {self.token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def state(self, resource: str, **filters: str) -> list[dict]:
        query = "&".join(f"filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in filters.items())
        body = self.request(f"/api/v0/{resource}?limit=1000&detail=true&{query}")
        return (body or {}).get("data", {}).get("result", {}).get("result", [])

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.state("nodes") if n.get("state") == "ALIVE"]

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node), then SIGKILL whatever is left in the
        process sessions this cluster started (raylet workers, job drivers): nothing else."""
        sessions = {p.pid for p in self.procs}
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for pid in [int(d) for d in os.listdir("/proc") if d.isdigit()]:
            try:
                if os.getsid(pid) in sessions:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs:
            if p.poll() is None:
                p.wait(timeout=10)
