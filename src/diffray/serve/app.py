"""`build_app(args)`: the Serve application builder named in configs/serve.yaml
(`import_path: diffray.serve.app:build_app`), so `serve run`, `serve deploy` and `diffray serve` all
build the same app. Args are validated here (ConfigError naming the field) before anything deploys, and
a model in a local folder is checked against the size limits here too (its replicas check every model).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from ray.serve import Application

from diffray.serve.config import ServeArgs, default_size, parse_args
from diffray.serve.exposure import enforce

log = logging.getLogger(__name__)


def generator_options(args: ServeArgs) -> dict[str, Any]:
    """Deployment options of the Generator from the args (replicas or autoscaling, resources, queue)."""
    g = args.generator
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": g.num_cpus, "num_gpus": g.num_gpus,
                              **({"resources": dict(g.resources)} if g.resources else {})},
        "max_ongoing_requests": g.max_ongoing_requests,
        "max_queued_requests": g.max_queued_requests,
    }
    if g.num_replicas is not None:
        opts["num_replicas"] = g.num_replicas
    else:
        a = g.autoscaling
        opts["autoscaling_config"] = {
            "min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas if a.initial_replicas is not None else a.min_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s, "metrics_interval_s": a.metrics_interval_s}
        if a.downscale_to_zero_delay_s is not None:
            opts["autoscaling_config"]["downscale_to_zero_delay_s"] = a.downscale_to_zero_delay_s
    return opts


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The diffray Serve application: Ingress -> Generator, or the Ingress alone drawing in its own
    replicas (`generator.in_ingress`).

    Args:
        args: `ServeArgs` fields (model, adapters_dir, controlnets, limits, auth, generator, batching,
            ingress, feedback); the `args:` mapping of a Serve config file.
    Raises:
        ConfigError: a bad arg (naming it), a local model whose native size is outside the limits (naming
            `limits.max_side`), or no API key while the proxy binds a non-loopback host (each Ingress replica
            checks both again at start, with the keys and model it sees).
    """
    from diffray.serve.deployments import Generator, Ingress

    cfg = parse_args(args)
    enforce(cfg)
    if Path(cfg.model).expanduser().is_dir():  # a builtin or hub model is read by the replicas only
        from diffray.models.loading import native_size, resolve_model_path

        default_size(cfg, native_size(resolve_model_path(cfg.model)))  # ConfigError naming limits.max_side
    plain = cfg.model_dump(mode="json")
    if cfg.generator.in_ingress:  # one deployment: the Generator's replicas, resources and autoscaling
        return Ingress.options(**{**generator_options(cfg), "max_ongoing_requests": cfg.ingress.max_ongoing_requests,
                                  "max_queued_requests": -1}).bind(None, plain)
    generator = Generator.options(**generator_options(cfg)).bind(plain)
    return Ingress.options(num_replicas=cfg.ingress.num_replicas,
                           ray_actor_options={"num_cpus": cfg.ingress.num_cpus},
                           max_ongoing_requests=cfg.ingress.max_ongoing_requests).bind(generator, plain)


def run_from_file(path: str, overrides: list[str] | None = None, blocking: bool = True) -> None:
    """`diffray serve CONFIG`: start Serve with the file's http_options on the cluster in RAY_ADDRESS (or a
    local one) and run the diffray application from it, blocking until interrupted. Serve's own logs stay
    in Ray's log files unless verbose (`diffray.cluster.connect_ray`); one line says where it listens."""
    from ray import serve

    from diffray.cluster import connect_ray
    from diffray.serve.config import load_serve_file
    from diffray.serve.replicas import log_replica_changes

    http_options, app, args = load_serve_file(path, overrides)
    host = str(http_options.get("host", "127.0.0.1"))
    connect_ray()
    serve.start(http_options=http_options)  # an already running Serve keeps its host: build_app asks it
    serve.run(build_app(args.model_dump(mode="json")), name=app["name"], route_prefix=app["route_prefix"])
    log.info("serving %s at http://%s:%s%s (API docs at /docs); Ctrl-C stops", app["name"], host,
             http_options.get("port", 8000), app["route_prefix"] or "/")
    if blocking:  # until Ctrl-C (KeyboardInterrupt), as `serve run` waits; replica count changes are logged
        log_replica_changes(app["name"], threading.Event())
