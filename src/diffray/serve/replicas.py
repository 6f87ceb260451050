"""Serve's view of the Generator's replicas, for `GET /v1/status`, `diffray serve`'s log and the autoscaling
benchmark: the count by replica state (`serve.status()`) and the ids of the replica actors alive now.

Serve names each replica's actor `SERVE_REPLICA::<app>#<deployment>#<replica id>` (namespace `serve`); the id
is the one a Generator puts in its answers (`serve.get_replica_context().replica_id.unique_id`).
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

REPLICA_ACTOR = "SERVE_REPLICA::{app}#{deployment}#"


def generator_replicas(app: str, deployment: str = "Generator") -> tuple[dict, list[str]]:
    """({status, replicas: {state: count}, running}, ids of the deployment's replica actors alive now
    (running, starting or stopping)). A deployment that is not there: status NOT_DEPLOYED, no replicas."""
    import ray
    from ray import serve

    application = serve.status().applications.get(app)
    overview = application.deployments.get(deployment) if application else None
    if overview is None:
        return {"status": "NOT_DEPLOYED", "replicas": {}, "running": 0}, []
    states = {str(getattr(state, "value", state)): n for state, n in overview.replica_states.items() if n}
    prefix = REPLICA_ACTOR.format(app=app, deployment=deployment)
    live = sorted(a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(prefix))
    return {"status": str(getattr(overview.status, "value", overview.status)), "replicas": states,
            "running": states.get("RUNNING", 0)}, live


def describe(states: dict[str, int]) -> str:
    """`{"RUNNING": 2, "STARTING": 1}` -> "2 running, 1 starting" ("none" when empty)."""
    return ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items())) or "none"


def log_replica_changes(app: str, stop: threading.Event, every_s: float = 2.0) -> None:
    """Until `stop` is set: one log line each time the Generator's replica count by state changes (the
    first line gives the count at start). A controller that does not answer is skipped until it does."""
    from ray.exceptions import RayError

    last = None
    while True:
        try:
            states = generator_replicas(app)[0]["replicas"]
        except (RayError, ConnectionError, TimeoutError) as exc:
            log.debug("serve.status() failed: %s", exc)
        else:
            if states != last:
                log.info("Generator replicas: %s", describe(states))
                last = states
        if stop.wait(every_s):
            return
