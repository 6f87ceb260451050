"""A two-node Ray cluster on this machine, driven as on a real one: `ray start --head` plus a second
`ray start --address` node with its own resources, token authentication on, the job server on
127.0.0.1; a LoRA job submitted with `ray job submit` whose two workers must span both nodes, and a
Serve app deployed with `serve deploy` that answers with the adapter the job trained, and a job
asking for 8 GPUs submitted with `diffray submit` that fails fast naming what the cluster has.

No folder is shared through the filesystem: the job's latent cache (`diffray data prepare`), its run
(checkpoints and artifact) and the Serve app's adapter registry all live on an S3 endpoint on 127.0.0.1
(the session's `s3` fixture, moto's server), which the nodes reach through the AWS_* variables they inherit.

The cluster is this module's own: its own temp dir, ports and token file; teardown stops only the
process sessions it started (never a bare `ray stop`, which would stop other local clusters).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from testkit.net import free_ports
from testkit.wait import wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RAY, DIFFRAY = str(BIN / "ray"), str(BIN / "diffray")


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
        return subprocess.Popen([RAY, "start", f"--temp-dir={self.root / name}", *args], env=self.env, cwd=REPO,
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


@pytest.fixture(scope="module")
def local_cluster(s3):  # the nodes inherit the S3 endpoint's AWS_* variables
    root = Path(tempfile.mkdtemp(prefix="drc-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = LocalCluster(root)
    try:
        cluster.start_nodes()
        yield cluster
    finally:
        cluster.stop()  # also after a failed start: stops whatever did start
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.e2e
@pytest.mark.slow
def test_token_auth_on_and_job_server_on_localhost_only(local_cluster):
    with pytest.raises(urllib.error.HTTPError) as denied:
        local_cluster.request("/api/jobs/", token=False)
    assert denied.value.code == 401
    assert local_cluster.request("/api/jobs/") == []
    nodes = local_cluster.alive_nodes()
    assert sorted(n["resources_total"]["CPU"] for n in nodes) == [1.0, 1.0]
    assert [n["resources_total"].get("node2") for n in nodes if not n["is_head_node"]] == [1.0]


@pytest.fixture(scope="module")
def two_node_job(local_cluster, s3) -> tuple[str, str, float, str]:
    """One `ray job submit`: `diffray data prepare` writes the latent cache to S3, then a LoRA job whose two
    1-CPU workers span the 1-CPU nodes trains from it, its run on S3 too. Returns (the bucket, the job's
    output, its wall time, the cache root). Both tests below use it: the serve test does not depend on
    another test having run first."""
    bucket = s3.bucket("cluster")
    runtime_env = {"env_vars": {"DIFFRAY_CACHE": os.environ["DIFFRAY_CACHE"], "PYTHONUNBUFFERED": "1"},
                   "excludes": [".git"]}
    cache = f"{bucket}/latents"
    job = ["configs/lora.yaml", "run.name=two-nodes", f"run.storage_path={bucket}/runs", f"data.cache={cache}",
           "train.max_steps=4", "train.checkpoint_every=4", "train.validate_every=null",
           # no warm-up and a high rate: four steps that move the images enough to tell the adapter from base
           "optim.warmup_steps=0", "optim.lr=2e-2", "scaling.num_workers=2", "scaling.cpus_per_worker=1"]
    t0 = time.time()
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", local_cluster.dashboard, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "bash", "-c", f"diffray data prepare {' '.join(job)} && diffray train {' '.join(job)}"],
        env=local_cluster.env, cwd=REPO, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return bucket, out, time.time() - t0, cache


@pytest.mark.e2e
@pytest.mark.slow
def test_ray_job_submit_trains_lora_on_workers_spanning_both_nodes(local_cluster, two_node_job, s3):
    bucket, out, wall, cache = two_node_job
    assert "succeeded" in out and "done: steps=4 " in out
    # The cache was built once (by `data prepare`) and read by training; the artifact is whole on S3.
    assert f"train: latent cache {cache}/" in out and "cache.json" in " ".join(s3.keys(cache))
    artifact = f"{bucket[5:]}/runs/two-nodes/artifact"
    assert {f"{artifact}/pytorch_lora_weights.safetensors", f"{artifact}/diffray_manifest.json"} <= set(
        s3.keys(f"{bucket}/runs/two-nodes/artifact"))
    # The run's logs are on S3 beside it (uploaded by rank 0's node at the checkpoint, the driver at the end):
    # its metrics show every step read latents from the cache, none encoded by the VAE or text encoder.
    logs = f"{bucket[5:]}/runs/two-nodes/logs"
    assert {f"{logs}/driver.log", f"{logs}/metrics.jsonl"} <= set(s3.keys(f"s3://{logs}")), s3.keys(f"s3://{logs}")
    rows = [json.loads(x) for x in s3.fs.open_input_stream(f"{logs}/metrics.jsonl").read().decode().splitlines()]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4], rows
    assert all(r["vae_encode_calls"] == 0 and r["text_encoder_calls"] == 0 for r in steps), steps

    # Each node has 1 CPU, so the two 1-CPU workers can only run one per node; Ray's own record of
    # the job's training-worker actors shows where they ran.
    job_id = next(j["job_id"] for j in local_cluster.request("/api/jobs/") if "run.name=two-nodes" in j["entrypoint"])
    workers = local_cluster.state("actors", class_name="RayTrainWorker", job_id=job_id)
    nodes = {n["node_id"]: n for n in local_cluster.alive_nodes()}
    placed = sorted(("node2" if "node2" in nodes[w["node_id"]]["resources_total"] else "head") for w in workers)
    assert placed == ["head", "node2"], workers
    print(f"two-node LoRA job {job_id}: workers on {placed}, {wall:.0f}s")


def pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.mark.e2e
@pytest.mark.slow
def test_serve_deploy_to_the_cluster_answers_with_the_trained_adapter(local_cluster, two_node_job, s3, tmp_path):
    import base64

    import yaml

    bucket = two_node_job[0]
    adapters = f"{bucket}/adapters"
    proc = subprocess.run([DIFFRAY, "publish", f"{bucket}/runs/two-nodes/artifact", adapters, "two-nodes"],
                          env=local_cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"published two-nodes: {adapters}/two-nodes" in proc.stdout, proc.stderr
    # An adapter caught mid-upload (its weights there, its card and manifest not yet) is never listed.
    weights = s3.fs.open_input_stream(f"{adapters[5:]}/two-nodes/pytorch_lora_weights.safetensors").read()
    with s3.fs.open_output_stream(f"{adapters[5:]}/half-uploaded/pytorch_lora_weights.safetensors") as f:
        f.write(weights)
    (port,) = free_ports(1)
    cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    cfg["proxy_location"] = "HeadOnly"  # both nodes share this machine's ports: one proxy
    cfg["http_options"].update(host="127.0.0.1", port=port)
    args = cfg["applications"][0]["args"]
    args.update(adapters_dir=adapters, adapters_listing_ttl_s=1.0, default_steps=4)
    args["generator"].update(num_cpus=0.5)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))
    serve_cli = str(BIN / "serve")
    proc = subprocess.run([serve_cli, "deploy", str(config), "--address", local_cluster.dashboard],
                          env=local_cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    url = f"http://127.0.0.1:{port}"
    def models() -> list[str]:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as resp:
            return [m["id"] for m in json.loads(resp.read())["data"]]

    wait_until(lambda: "two-nodes" in models(), "the app to list the adapter two-nodes", timeout=300, interval=1)
    assert "half-uploaded" not in models()

    def served(model: str) -> np.ndarray:
        body = json.dumps({"prompt": "a red circle", "model": model, "size": "64x64", "seed": 11}).encode()
        req = urllib.request.Request(f"{url}/v1/images/generations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return pixels(base64.b64decode(json.loads(resp.read())["data"][0]["b64_json"]))

    # The same requests rendered here by the serving engine itself, without Ray: the deployed app must
    # answer `two-nodes` with the adapter's image and `base` with the base model's (up to the float noise
    # of a replica's thread count), and the two differ by far more than that noise.
    from diffray.serve.config import parse_args
    from diffray.serve.engine import ImageEngine
    from diffray.serve.schemas import Job

    engine = ImageEngine(parse_args({"model": args["model"], "adapters_dir": adapters}), device="cpu")
    engine.acquire(["two-nodes"])

    def local(adapters) -> np.ndarray:
        job = Job(prompt="a red circle", n=1, width=64, height=64, steps=4, guidance=7.5, seed=11, adapters=adapters)
        return pixels(engine.run([job])[0][0])

    want_adapted, want_base = local((("two-nodes", 1.0),)), local(())
    with pytest.raises(urllib.error.HTTPError) as missing:
        served("half-uploaded")
    assert missing.value.code == 404
    got_adapted, got_base = served("two-nodes"), served("base")
    gap = np.abs(want_adapted - want_base).mean()
    noise = max(np.abs(got_adapted - want_adapted).mean(), np.abs(got_base - want_base).mean())
    print(f"adapter vs base {gap:.3f}/255, served vs local {noise:.3f}/255")
    assert gap > 2.0, f"the trained adapter barely changes the image ({gap:.3f}/255)"
    assert noise < 0.25 and noise < gap / 8, (noise, gap)

    proc = subprocess.run([serve_cli, "shutdown", "-y", "--address", local_cluster.dashboard],
                          env=local_cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(f"{url}/v1/models", timeout=10)


@pytest.mark.e2e
@pytest.mark.slow
def test_diffray_submit_of_an_8_gpu_job_fails_fast_naming_what_the_cluster_has(local_cluster, tmp_path):
    proc = subprocess.run(
        [DIFFRAY, "submit", "--address", local_cluster.dashboard, "--working-dir", str(REPO),
         "--env", f"DIFFRAY_CACHE={os.environ['DIFFRAY_CACHE']}", "--storage-path", str(tmp_path / "runs"),
         "--", "train", "configs/lora.yaml", "scaling.num_workers=8", "scaling.use_gpu=true"],
        env=local_cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    want = ("scaling: 8 workers x (1 CPU, 1 GPU) do not fit this cluster, whose 2 node(s) have "
            "[1 CPU, 0 GPU; 1 CPU, 0 GPU]")
    assert want in proc.stdout  # the job's own one-line error, streamed from its logs
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("diffray: error: job raysubmit_") and " FAILED" in last and "GPU" in last, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_diffray_submit_to_an_unreachable_address_is_one_line():
    (port,) = free_ports(1)
    proc = subprocess.run([DIFFRAY, "submit", "--address", f"http://127.0.0.1:{port}", "--", "train",
                           "configs/lora.yaml", "run.storage_path=/tmp/unused"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"diffray: error: cannot reach the Ray job server at http://127.0.0.1:{port} (Failed to connect to Ray at "
        f"address: http://127.0.0.1:{port}); is the cluster up? For a cluster started with `ray up cluster.yaml`, "
        "run `ray dashboard cluster.yaml` (an SSH tunnel) and use http://127.0.0.1:8265"]


@pytest.mark.e2e
def test_diffray_submit_checks_the_config_before_uploading():
    proc = subprocess.run([DIFFRAY, "submit", "--address", "http://127.0.0.1:9", "--", "train", "configs/lora.yaml",
                           "strategy.name=fsdp"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "diffray: error: strategy.name: Input should be 'deepspeed' or 'ddp'"
