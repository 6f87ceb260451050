"""cluster.yaml against the Ray cluster launcher's own schema and checks, and the KubeRay manifests'
structure and security defaults (token auth on, nothing exposed outside the cluster)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = sorted((REPO / "deploy" / "kuberay").glob("*.yaml"))
RAY_PORTS = {6379, 8265, 10001, 8000, 8076}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_cluster_yaml_validates_against_the_launchers_schema():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load(REPO / "cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs before touching AWS


def test_cluster_yaml_node_types_and_autoscaling():
    cfg = load(REPO / "cluster.yaml")
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpus = {name: t["resources"]["GPU"] for name, t in types.items() if t["resources"].get("GPU")}
    assert sorted(gpus.values()) == [1, 4]  # a single-GPU (serving) type and a multi-GPU (sharded) type
    for name in gpus:
        assert types[name]["min_workers"] == 0 < types[name]["max_workers"]
    assert cfg["max_workers"] == sum(types[n]["max_workers"] for n in gpus)
    assert 0 < cfg["idle_timeout_minutes"] <= 30


def test_cluster_yaml_installs_the_working_tree_with_cuda_torch_and_keeps_ports_private():
    cfg = load(REPO / "cluster.yaml")
    assert cfg["file_mounts"]["~/diffray"] == "."
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    setup = " ".join(cfg["setup_commands"])
    assert "download.pytorch.org/whl/cu" in setup and "pip install -q -e ~/diffray" in setup
    assert ".venv" in cfg["rsync_exclude"]
    head, workers = " ".join(cfg["head_start_ray_commands"]), " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for rule in cfg["provider"]["security_group"]["IpPermissions"]:
        opened = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        public = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        assert not (public and opened & RAY_PORTS), rule


def test_the_kuberay_set_is_complete():
    kinds = sorted(load(p)["kind"] for p in KUBERAY)
    assert kinds == ["RayCluster", "RayJob", "RayService"]


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[doc["kind"]]()


def pod_specs(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_structure(path):
    doc = load(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["metadata"]["name"]
    cluster = cluster_spec(doc)
    assert cluster["rayVersion"] == "2.60.0"
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["template"]["spec"]["containers"][0]["image"]
    names = set()
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] not in names
        names.add(group["groupName"])
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        container = group["template"]["spec"]["containers"][0]
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1 and container["image"]
        assert container["resources"]["requests"] == limits  # Guaranteed QoS: no surprise evictions
    if doc["kind"] == "RayJob":
        assert doc["spec"]["entrypoint"].startswith("diffray train ")
        assert doc["spec"]["shutdownAfterJobFinishes"] is True
        assert "s3://" in doc["spec"]["entrypoint"]  # runs outlive the cluster
    if doc["kind"] == "RayService":
        from diffray.serve.config import parse_args

        apps = yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
        assert apps[0]["import_path"] == "diffray.serve.app:build_app"
        args = parse_args(apps[0]["args"])  # the app's own validation of its args
        assert args.generator.num_gpus >= 1 and args.adapters_dir.startswith("/")
        for pod in pod_specs(cluster):  # the keys reach build_app (head) and the replicas (workers)
            for container in pod["containers"]:
                assert "DIFFRAY_API_KEYS" in {e["name"] for e in container.get("env", [])}


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_manifest_keeps_token_auth_on_and_exposes_nothing(path):
    doc = load(path)
    cluster = cluster_spec(doc)
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert not cluster["headGroupSpec"].get("enableIngress", False)
    assert "serveService" not in doc["spec"]  # RayService: Serve stays on its default ClusterIP service
    for pod in pod_specs(cluster):
        assert not pod.get("hostNetwork", False)
        for container in pod["containers"]:
            for port in container.get("ports", []):
                assert "hostPort" not in port, port
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", "token") == "token"


def test_the_rayservice_keeps_no_feedback_on_a_pods_own_disk():
    """The Ingress's feedback store (SQLite, on by default at ./feedback/feedback.db) on a worker pod's own disk
    would vanish with the pod when it scales down, and with the whole cluster at every RayService upgrade: it is
    either off or on a persistent volume that every pod running the Ingress mounts writable."""
    from diffray.serve.config import parse_args

    doc = load(REPO / "deploy" / "kuberay" / "rayservice.yaml")
    args = parse_args(yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"][0]["args"])
    if not args.feedback.enabled:
        return
    for pod in [g["template"]["spec"] for g in cluster_spec(doc)["workerGroupSpecs"]]:  # the head has no CPU
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])
                  if m["name"] in claims and not m.get("readOnly")]
        assert any(Path(args.feedback.path).is_relative_to(m) for m in mounts), (args.feedback.path, mounts)
