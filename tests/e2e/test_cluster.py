"""A Ray cluster on this machine, driven as a real autoscaling one is: `ray start --head` running Ray's own
autoscaler with the fake multi-node provider (it starts a real raylet for each node it launches and stops
it once idle for `idle_timeout_minutes`), token authentication on, the job server on 127.0.0.1. The node
types are cluster.yaml's, one CPU each: `gpu_1x` keeps its custom resource `A10G` (the GPU it stands for
is dropped: no CUDA here); the head keeps one CPU (cluster.yaml's has none) for the jobs' data tasks.

- A LoRA job submitted with `ray job submit` whose two workers each need `A10G: 1`: diffray sees the
  autoscaler and waits instead of failing fast; the autoscaler launches two `gpu_1x` nodes, one worker runs
  on each, and both nodes are removed after the idle timeout. (Without an autoscaler the same job fails fast:
  tests/integration/test_lora_train.py::test_workers_the_cluster_cannot_hold_fail_fast.)
- A Serve app deployed with `serve deploy` whose replicas need `A10G: 1`: the autoscaler launches a node
  for it, and it answers with the adapter the job trained.
- A job asking for 8 GPUs submitted with `diffray submit` and `scaling.wait_for_resources=false`: it
  fails fast naming what the cluster has.

No folder is shared through the filesystem: the job's latent cache (`diffray data prepare`), its run
(checkpoints and artifact) and the Serve app's adapter registry all live on an S3 endpoint on 127.0.0.1
(the session's `s3` fixture, moto's server), which the nodes reach through the AWS_* variables they inherit.

The cluster is this module's own (`testkit.raycluster.LocalCluster`): its own temp dir, ports and token
file; teardown stops only the process sessions it started (the launched nodes are the head's children).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from testkit.net import free_ports
from testkit.raycluster import BIN, RAY, REPO, LocalCluster
from testkit.wait import wait_until

DIFFRAY = str(BIN / "diffray")
IDLE_TIMEOUT_MIN = 1.0  # a node idle this long goes; shorter ones removed nodes between a job's steps on slow hosts


def fake_cluster_config(gcs: str) -> dict:
    """cluster.yaml with the fake multi-node provider: its head and gpu_1x types, one CPU per node."""
    real = yaml.safe_load((REPO / "cluster.yaml").read_text())
    types = real["available_node_types"]
    gpu = {k: v for k, v in types["gpu_1x"]["resources"].items() if k not in ("CPU", "GPU")}
    assert gpu == {"A10G": 1}, "cluster.yaml's gpu_1x changed its custom resource"
    return {
        "cluster_name": "diffray-fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        # use_node_id_as_ip: each fake node is told apart by its id; the nodes join the head's GCS here.
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_1x": {"resources": {"CPU": 1, **gpu}, "node_config": {}, "min_workers": 0, "max_workers": 2}},
        "head_node_type": "ray.head.default",
        # the launcher's keys, unused by this provider (it starts raylets itself), required by the schema
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": []}


class AutoscalingCluster(LocalCluster):
    """A head node running Ray's autoscaler with the fake multi-node provider; it launches the rest."""

    def start_nodes(self) -> None:
        p = self.ports
        config = self.root / "autoscaler.json"
        config.write_text(json.dumps(fake_cluster_config(self.gcs)))
        self.cwd = self.root  # jobs below run without a working dir: what they write relative lands here
        # The autoscaler updates every second (5 s by default) and may use the fake provider.
        self.env.update(AUTOSCALER_UPDATE_INTERVAL_S="1", RAY_FAKE_CLUSTER="1")
        self.procs.append(self.start("head", [
            "--head", f"--port={p['gcs']}", f"--autoscaling-config={config}", "--num-cpus=1", "--block",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={p['dash']}",
            f"--ray-client-server-port={p['client']}", f"--dashboard-agent-listen-port={p['agent1']}",
            "--disable-usage-stats", "--node-ip-address=127.0.0.1"]))
        self.wait_for(lambda: self.request("/api/version") is not None, "the head's job server")
        self.wait_for(lambda: len(self.alive_nodes()) == 1, "the head in the state API")

    def monitor_log(self) -> str:
        """The autoscaler's own log on the head: every launch and termination it decided."""
        log = self.root / "head" / "session_latest" / "logs" / "monitor.log"
        return log.read_text() if log.is_file() else ""


def gpu_nodes(cluster: LocalCluster) -> list[dict]:
    return [n for n in cluster.alive_nodes() if "A10G" in n["resources_total"]]


def gpu_node_ids_ever(cluster: LocalCluster) -> set[str]:
    """Every gpu_1x node the state API knows, alive or removed."""
    return {n["node_id"] for n in cluster.state("nodes") if "A10G" in n["resources_total"]}


def submit(cluster: LocalCluster, command: str, timeout: float) -> tuple[int, str]:
    """`ray job submit` of a bash command, without a working dir (see `autoscaled_job`); (exit status, output)."""
    runtime_env = {"env_vars": {"DIFFRAY_CACHE": os.environ["DIFFRAY_CACHE"], "PYTHONUNBUFFERED": "1"}}
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard, "--runtime-env-json", json.dumps(runtime_env),
         "--", "bash", "-c", command],
        env=cluster.env, cwd=cluster.root, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


def train_workers(cluster: LocalCluster, run_name: str) -> list[dict]:
    """Ray's record of the training-worker actors of the job whose entrypoint sets run.name=`run_name`."""
    job_id = next(j["job_id"] for j in cluster.request("/api/jobs/") if f"run.name={run_name}" in j["entrypoint"])
    return cluster.state("actors", class_name="RayTrainWorker", job_id=job_id)


def launches(cluster: AutoscalingCluster) -> int:
    """gpu_1x nodes the autoscaler has launched so far, by its log."""
    return sum(int(n) for n in re.findall(r"Launching (\d+) nodes, type gpu_1x\.", cluster.monitor_log()))


@pytest.fixture(scope="module")
def local_cluster(s3):  # the nodes inherit the S3 endpoint's AWS_* variables
    root = Path(tempfile.mkdtemp(prefix="drc-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = AutoscalingCluster(root)
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
    assert [(n["is_head_node"], n["resources_total"]["CPU"]) for n in nodes] == [(True, 1.0)]  # the head alone


@pytest.fixture(scope="module")
def autoscaled_job(local_cluster, s3) -> dict:
    """One `ray job submit`: `diffray data prepare` writes the latent cache to S3, then a LoRA job whose two
    workers each need `A10G: 1` (a gpu_1x node) trains from it, its run on S3 too. The autoscaler launches
    two nodes; the fixture returns once it has removed them again (idle). Both tests below use it: the serve
    test does not depend on another test having run first."""
    bucket = s3.bucket("cluster")
    # No --working-dir: the fake provider's nodes share the head's session folder, and each node's runtime-env
    # agent unpacks a job's working dir afresh into it, deleting the running driver's cwd when a node joins
    # mid-job. (On a real cluster each node has its own disk; tests below and the README use --working-dir.)
    cache = f"{bucket}/latents"
    job = [f"{REPO}/configs/lora.yaml", "run.name=autoscaled", f"run.storage_path={bucket}/runs",
           f"data.cache={cache}", "train.max_steps=4", "train.checkpoint_every=4", "train.validate_every=null",
           # no warm-up and a high rate: four steps that move the images enough to tell the adapter from base
           "optim.warmup_steps=0", "optim.lr=2e-2", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
           "'scaling.resources_per_worker={A10G: 1}'"]
    t0 = time.time()
    code, out = submit(local_cluster, f"diffray data prepare {' '.join(job)} && diffray train {' '.join(job)}", 400)
    assert code == 0, out[-4000:] + local_cluster.monitor_log()[-3000:]
    wall = time.time() - t0
    # Snapshot of where the job ran, while the launched nodes are still listed by the state API.
    workers, launched = train_workers(local_cluster, "autoscaled"), gpu_node_ids_ever(local_cluster)
    t1 = time.time()
    wait_until(lambda: not gpu_nodes(local_cluster), "the launched nodes to be removed once idle", timeout=120,
               interval=1)
    return {"bucket": bucket, "out": out, "wall": wall, "cache": cache, "workers": workers, "launched": launched,
            "idle_removal": time.time() - t1, "launches": launches(local_cluster)}


@pytest.mark.e2e
@pytest.mark.slow
def test_ray_job_submit_waits_for_the_autoscaler_and_trains_lora_on_the_nodes_it_launches(local_cluster,
                                                                                          autoscaled_job, s3):
    job = autoscaled_job
    bucket, out, cache = job["bucket"], job["out"], job["cache"]
    assert "succeeded" in out and "done: steps=4 " in out
    # diffray saw the autoscaler: it said what was missing and waited instead of failing fast.
    assert ("scaling: 2 workers x (1 CPU, 1 A10G) do not fit this cluster, whose 1 node(s) have [1 CPU, 0 A10G] "
            "(room for 0): waiting for the cluster's autoscaler to add nodes") in out, out[-4000:]
    # The cache was built once (by `data prepare`) and read by training; the artifact is whole on S3.
    assert f"train: latent cache {cache}/" in out and "cache.json" in " ".join(s3.keys(cache))
    artifact = f"{bucket[5:]}/runs/autoscaled/artifact"
    assert {f"{artifact}/pytorch_lora_weights.safetensors", f"{artifact}/diffray_manifest.json"} <= set(
        s3.keys(f"{bucket}/runs/autoscaled/artifact"))
    # The run's logs are on S3 beside it (uploaded by rank 0's node at the checkpoint, the driver at the end):
    # its metrics show every step read latents from the cache, none encoded by the VAE or text encoder.
    logs = f"{bucket[5:]}/runs/autoscaled/logs"
    assert {f"{logs}/driver.log", f"{logs}/metrics.jsonl"} <= set(s3.keys(f"s3://{logs}")), s3.keys(f"s3://{logs}")
    rows = [json.loads(x) for x in s3.fs.open_input_stream(f"{logs}/metrics.jsonl").read().decode().splitlines()]
    steps = [r for r in rows if "loss" in r and "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4], rows
    assert all(r["vae_encode_calls"] == 0 and r["text_encoder_calls"] == 0 for r in steps), steps

    # Ray's own record of the job's training-worker actors: one on each of two nodes the autoscaler launched
    # (a gpu_1x node holds one 1-CPU worker). `data prepare`'s tasks may have had it launch one already:
    # the head has a single CPU for them.
    trail = "\n".join(re.findall(r".*(?:Launching \d+ nodes|Terminating the node).*", local_cluster.monitor_log()))
    placed = [w["node_id"] for w in job["workers"]]
    assert len(set(placed)) == 2 and set(placed) <= job["launched"], (placed, job["launched"], trail)
    assert job["launches"] == len(job["launched"]) >= 2, (job["launches"], job["launched"], trail)
    # Idle after the job, both were removed (the fixture waited for it); the autoscaler's log says why.
    terminated = set(re.findall(r"Terminating the node with id (\w+) and ip \w+\. \(idle\)",
                                local_cluster.monitor_log()))
    assert job["launched"] <= terminated, (job["launched"], terminated)  # the fake provider's ids are Ray's
    print(f"autoscaled LoRA job: {job['wall']:.0f}s; its 2 launched nodes removed {job['idle_removal']:.0f}s after")


def pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


@pytest.mark.e2e
@pytest.mark.slow
def test_serve_deploy_to_the_cluster_answers_with_the_trained_adapter(local_cluster, autoscaled_job, s3, tmp_path):
    import base64

    bucket = autoscaled_job["bucket"]
    adapters = f"{bucket}/adapters"
    proc = subprocess.run([DIFFRAY, "publish", f"{bucket}/runs/autoscaled/artifact", adapters, "autoscaled"],
                          env=local_cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"published autoscaled: {adapters}/autoscaled" in proc.stdout, proc.stderr
    # An adapter caught mid-upload (its weights there, its card and manifest not yet) is never listed.
    weights = s3.fs.open_input_stream(f"{adapters[5:]}/autoscaled/pytorch_lora_weights.safetensors").read()
    with s3.fs.open_output_stream(f"{adapters[5:]}/half-uploaded/pytorch_lora_weights.safetensors") as f:
        f.write(weights)
    (port,) = free_ports(1)
    cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    cfg["proxy_location"] = "HeadOnly"  # both nodes share this machine's ports: one proxy
    cfg["http_options"].update(host="127.0.0.1", port=port)
    args = cfg["applications"][0]["args"]
    args.update(adapters_dir=adapters, adapters_listing_ttl_s=1.0, default_steps=4)
    # Replicas need a gpu_1x node; the job's were removed (the fixture waited), so the autoscaler launches one.
    args["generator"].update(num_cpus=0.5, resources={"A10G": 1})
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

    wait_until(lambda: "autoscaled" in models(), "the app to list the adapter autoscaled", timeout=300, interval=1)
    assert "half-uploaded" not in models()
    # The Generator's replica (Ray actor class ServeReplica:<app>:Generator) waits for the node launched for it.
    def replicas() -> list[dict]:
        return [a for a in local_cluster.state("actors", state="ALIVE") if a["class_name"].endswith(":Generator")]

    replica = wait_until(replicas, "the Generator replica to start", timeout=120, interval=1)
    placed = {n["node_id"] for n in gpu_nodes(local_cluster)}
    assert len(replica) == 1 and replica[0]["node_id"] in placed, (replica, placed)
    assert launches(local_cluster) == autoscaled_job["launches"] + 1, local_cluster.monitor_log()[-3000:]

    def served(model: str) -> np.ndarray:
        body = json.dumps({"prompt": "a red circle", "model": model, "size": "64x64", "seed": 11}).encode()
        req = urllib.request.Request(f"{url}/v1/images/generations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return pixels(base64.b64decode(json.loads(resp.read())["data"][0]["b64_json"]))

    # The same requests rendered here by the serving engine itself, without Ray: the deployed app must
    # answer `autoscaled` with the adapter's image and `base` with the base model's (up to the float noise
    # of a replica's thread count), and the two differ by far more than that noise.
    from diffray.serve.config import parse_args
    from diffray.serve.engine import ImageEngine
    from diffray.serve.schemas import Job

    engine = ImageEngine(parse_args({"model": args["model"], "adapters_dir": adapters}), device="cpu")
    engine.acquire(["autoscaled"])

    def local(adapters) -> np.ndarray:
        job = Job(prompt="a red circle", n=1, width=64, height=64, steps=4, guidance=7.5, seed=11, adapters=adapters)
        return pixels(engine.run([job])[0][0])

    want_adapted, want_base = local((("autoscaled", 1.0),)), local(())
    with pytest.raises(urllib.error.HTTPError) as missing:
        served("half-uploaded")
    assert missing.value.code == 404
    got_adapted, got_base = served("autoscaled"), served("base")
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
    """Followed, the job's one-line error and its status; with --no-follow, the submission id alone on stdout."""
    def submit(*options):
        return subprocess.run(
            [DIFFRAY, "submit", "--address", local_cluster.dashboard, "--working-dir", str(REPO), *options,
             "--env", f"DIFFRAY_CACHE={os.environ['DIFFRAY_CACHE']}", "--storage-path", str(tmp_path / "runs"),
             "--", "train", "configs/lora.yaml", "scaling.num_workers=8", "scaling.use_gpu=true",
             "scaling.wait_for_resources=false"],  # this cluster has an autoscaler: diffray would wait by default
            env=local_cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)

    quick = submit("--no-follow")
    assert quick.returncode == 0 and re.fullmatch(r"raysubmit_\w+\n", quick.stdout), quick.stdout + quick.stderr
    assert f"submitted {quick.stdout.strip()} to {local_cluster.dashboard}" in quick.stderr, quick.stderr
    proc = submit()
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the job's own one-line error, streamed from its logs (a gpu_1x node the Serve test used may still be up)
    want = r"scaling: 8 workers x \(1 CPU, 1 GPU\) do not fit this cluster, whose [12] node\(s\) have \[1 CPU, 0 GPU"
    assert re.search(want, proc.stdout), proc.stdout[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("diffray: error: job raysubmit_") and " FAILED" in last and "GPU" in last, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
def test_diffray_submit_to_an_unreachable_address_is_one_line():
    (port,) = free_ports(1)
    proc = subprocess.run([DIFFRAY, "submit", "--address", f"http://127.0.0.1:{port}", "--", "train",
                           "configs/lora.yaml", "run.storage_path=s3://bucket/unused"],  # a local one adds a warning
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


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.eval  # ~2 min; `make test-eval`
def test_a_search_with_more_trials_than_the_head_holds_runs_them_at_once_on_launched_nodes(local_cluster, s3):
    """Two trials of one 1-CPU worker each needing `A10G: 1`: with the autoscaler detected, the experiment asks
    for both at once (not the alive nodes' room, none), and the autoscaler launches a node for each."""
    bucket = s3.bucket("cluster-tune")
    before = launches(local_cluster)
    job = [f"{REPO}/configs/tune_lora.yaml", "run.name=scaled", f"run.storage_path={bucket}/tune",
           "'tune.space={lora.rank: {grid: [4, 8]}, lora.alpha: {same_as: lora.rank}}'", "tune.scheduler.name=fifo",
           "train.max_steps=2", "train.validate_every=2", "train.checkpoint_every=2",
           "'scaling.resources_per_worker={A10G: 1}'"]
    code, out = submit(local_cluster, f"diffray tune {' '.join(job)}", 600)
    assert code == 0 and "2 trials (2 completed, 0 stopped early)" in out, out[-4000:]
    workers, gpu = train_workers(local_cluster, "scaled"), gpu_node_ids_ever(local_cluster)
    assert len(workers) == 2 and {w["node_id"] for w in workers} <= gpu, (workers, gpu)
    # The trials ran at once, on two different nodes: the spans of their metrics (logs uploaded to S3) overlap.
    logs = sorted(k for k in s3.keys(f"{bucket}/tune/scaled") if k.endswith("/logs/metrics.jsonl"))
    spans = []
    for key in logs:
        times = [json.loads(x)["time"] for x in s3.fs.open_input_stream(key).read().decode().splitlines()]
        spans.append((min(times), max(times)))
    (a, b) = sorted(spans)
    assert len(logs) == 2 and b[0] < a[1], (logs, spans)
    assert len({w["node_id"] for w in workers}) == 2, workers
    assert launches(local_cluster) >= before + 1, local_cluster.monitor_log()[-3000:]
