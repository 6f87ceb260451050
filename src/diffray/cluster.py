"""The Ray cluster edge shared by training, Tune, data jobs and serving: connect (or start a local
cluster) with diffray's output settings, the environment Ray workers get, and whether a job's workers
can fit the cluster at all.
"""

from __future__ import annotations

import logging
import os

from diffray import logs
from diffray.errors import ConfigError

log = logging.getLogger(__name__)

# Environment of every Ray Train worker; DIFFRAY_HOOK* and DIFFRAY_VERBOSE are passed on when set.
WORKER_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
FORWARDED_PREFIXES = ("DIFFRAY_HOOK", logs.VERBOSE_ENV)
# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s) and
# waits at least that long between state changes: at 0.5 s a 20-step LoRA run took 23.3 s instead of 25.9 s
# (4 runs each, side by side, tiny model, 2 workers on 2 cores). A value in the driver's environment wins.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def ray_train_env() -> dict[str, str]:
    """`RAY_TRAIN_ENV`, each value the driver's own where it sets one. Ray Train passes these from the
    process that calls `fit()` to its controller and workers."""
    return {k: os.environ.get(k, v) for k, v in RAY_TRAIN_ENV.items()}


def forwarded_env() -> dict[str, str]:
    """What a process on the cluster (a Tune trial, a Train worker) takes from the driver: Ray Train's
    settings and the DIFFRAY_HOOK* / DIFFRAY_VERBOSE variables (they do not inherit the driver's environment)."""
    return {**ray_train_env(), **{k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}}


def worker_env_vars() -> dict[str, str]:
    """The environment of every Ray Train worker: `WORKER_ENV` plus `forwarded_env()`."""
    return {**WORKER_ENV, **forwarded_env()}


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local one.

    Workers' output stays in Ray's log files unless verbose (`log_to_driver`). A local cluster keeps
    Ray's token auth on. Its own listeners are loopback only; Ray's core processes (GCS, raylet, workers,
    agents) bind the wildcard address in Ray 2.60 whatever `_node_ip_address` says (Ray resolves
    127.0.0.1 to the node's address), so the token is what guards them (tests/integration/
    test_cluster_ports.py lists them). Its dashboard (127.0.0.1 only) is on
    because Ray Train's placement-group cleaner asks the state API whether a controller has died: without
    it a trial that Tune stops leaks its workers' placement group.
    """
    check_cluster_address(os.environ.get("RAY_ADDRESS", ""))  # before this process's environment is changed
    import ray
    from ray.data import DataContext  # imported here so its loggers exist when they are quieted

    # Ray Data's progress bars and execution plans: the DataContext travels with every dataset, so its
    # actors and tasks follow the driver's setting.
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = logs.verbose()
    logs.quiet_libraries()
    os.environ.update(ray_train_env())  # this process calls fit(): Ray Train reads them here
    if ray.is_initialized():
        return
    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=logs.verbose())
    else:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=logs.verbose())
    logs.quiet_libraries()  # handlers Ray adds while it starts


def is_job_server_url(address: str) -> bool:
    """An http(s) URL: a Ray job server's (dashboard's) address, not a cluster's GCS address (HOST:PORT)."""
    return address.split("://")[0].lower() in ("http", "https") and "://" in address


def check_cluster_address(address: str) -> None:
    """Refuse a job server URL in RAY_ADDRESS (Ray's job docs export one for `ray job submit`): `ray.init`
    wants the cluster's GCS address.

    Raises:
        ConfigError: naming the variable and what to do instead.
    """
    if is_job_server_url(address):
        raise ConfigError(f"RAY_ADDRESS={address} is a job server URL (what `ray job submit` and `diffray submit` "
                          "read), not a cluster to join: unset it to run on a local cluster, set it to the head's "
                          "GCS address (HOST:6379) on a cluster node, or run the command with `diffray submit`")


def workers_that_fit(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many worker bundles the nodes (their total resources) can hold, each bundle on one node."""
    fit = 0
    for node in nodes:
        fit += int(min((node.get(k, 0.0) / v for k, v in bundle.items() if v > 0), default=0) + 1e-9)
    return fit


def alive_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected cluster."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


# Ray's monitor (on the head node) writes its report here every few seconds. On a cluster started without
# an autoscaling config it runs a read-only provider whose node types are the nodes themselves (`node_<id>`);
# with one, nodes map to the config's node types (`ray up`, KubeRay, the fake multi-node provider).
AUTOSCALER_STATUS_KEY = "__autoscaling_status"
AUTOSCALER_STATUS_WAIT_S = 12.0  # the monitor's first report after a head starts (it updates every 5 s)


def autoscales(status: dict) -> bool:
    """Whether a monitor report (`AUTOSCALER_STATUS_KEY`'s JSON) comes from an autoscaler with node types
    of its own, rather than the read-only view of a fixed cluster."""
    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(node_type != f"node_{node_id}" for node_id, node_type in mapping.items())


def has_autoscaler(wait_s: float = AUTOSCALER_STATUS_WAIT_S) -> bool:
    """Whether the connected cluster runs Ray's autoscaler (see `autoscales`). Waits up to `wait_s` for
    the monitor's first report on a head that has just started; no report by then counts as none."""
    import json
    import time

    from ray.experimental.internal_kv import _internal_kv_get

    deadline = time.monotonic() + wait_s
    while (raw := _internal_kv_get(AUTOSCALER_STATUS_KEY)) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        return raw is not None and autoscales(json.loads(raw))
    except (ValueError, AttributeError):  # a report this Ray version writes differently: a fixed cluster
        return False


def nodes_are_added(scaling) -> bool:
    """Whether jobs wait for nodes rather than fit the alive ones: `scaling.wait_for_resources`, or when
    it is null, whether the cluster has an autoscaler."""
    return scaling.wait_for_resources if scaling.wait_for_resources is not None else has_autoscaler()


def check_resources(scaling) -> None:
    """Fail fast when the cluster's alive nodes can never hold `scaling.num_workers` workers: Ray would
    otherwise wait forever for a placement. On a cluster with an autoscaler (`has_autoscaler`) it logs
    what is missing and lets Ray wait for the nodes the autoscaler adds; `scaling.wait_for_resources`
    true (always wait) or false (always fail fast) overrides the detection.

    Raises:
        ConfigError: naming each resource a worker needs, the count and what the nodes have.
    """
    if scaling.wait_for_resources:
        return
    bundle = scaling.worker_bundle()
    nodes = alive_nodes()
    fit = workers_that_fit(bundle, nodes)
    if fit >= scaling.num_workers:
        return
    need = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    have = "; ".join(", ".join(f"{n.get(k, 0):g} {k}" for k in bundle) for n in nodes) or "no nodes"
    short = (f"scaling: {scaling.num_workers} workers x ({need}) do not fit this cluster, whose {len(nodes)} "
             f"node(s) have [{have}] (room for {fit})")
    if nodes_are_added(scaling):
        log.info("%s: waiting for the cluster's autoscaler to add nodes (scaling.wait_for_resources=false "
                 "fails instead)", short)
        return
    raise ConfigError(f"{short}; lower scaling.num_workers or cpus_per_worker, set scaling.use_gpu=false, or "
                      "scaling.wait_for_resources=true on a cluster whose nodes another process adds")
