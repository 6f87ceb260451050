"""What the benchmark scripts share."""

from __future__ import annotations

import os


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile of xs (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def init_ray(num_cpus: int | None = None) -> None:
    """Start a local Ray cluster of `num_cpus` CPUs (Ray's default: the machine's cores) for this run, or
    join the one in RAY_ADDRESS when it is set, as `diffray` commands do (the slow suite's toy-size runs share
    its cluster: no start-up per script). The dashboard, on 127.0.0.1 only, serves the state API that Ray
    Train's placement-group cleaner polls for the controller (without it a run's placement group was removed
    under load, killing its workers)."""
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
