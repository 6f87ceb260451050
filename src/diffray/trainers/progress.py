"""A training run's side channel from its workers to the driver, and the driver's view of progress.

`RunStatus` is one small actor per run: rank 0 hands it every step's numbers without waiting, and a
worker records there the outcomes that are not checkpoints (the step of a NaN loss). `watch_progress`
runs a driver thread that waits on it while `fit()` runs and passes each new step to a callback (the
CLI draws its progress bar from that).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable

import ray


@ray.remote(num_cpus=0)
class RunStatus:
    """Values set by workers (`set`/`get`) and the latest step's metrics (`progress`/`next_progress`)."""

    def __init__(self):
        self.values: dict[str, Any] = {}
        self.latest: dict[str, Any] | None = None
        self.seq = 0  # counts progress updates: steps repeat after a worker-group restart
        self.changed = asyncio.Event()

    async def set(self, key: str, value: Any) -> None:
        self.values[key] = value

    async def get(self) -> dict[str, Any]:
        return dict(self.values)

    async def progress(self, metrics: dict[str, Any]) -> None:
        self.latest, self.seq = metrics, self.seq + 1
        self.changed.set()

    async def next_progress(self, after: int, timeout_s: float) -> tuple[int, dict[str, Any]] | None:
        """(update number, metrics) of the latest update once it is past `after`; None after timeout_s."""
        while self.seq <= after:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                return None
        return self.seq, self.latest


class watch_progress:
    """Context manager: while it is open, `on_step(metrics)` runs on a daemon thread for every update
    rank 0 sends to `status`; on exit the last update is delivered before the thread stops."""

    def __init__(self, status, on_step: Callable[[dict[str, Any]], None] | None):
        self.status, self.on_step = status, on_step
        self.seen = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="diffray-progress", daemon=True)

    def __enter__(self) -> watch_progress:
        if self.on_step is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.on_step is None:
            return
        self.stop.set()
        self.thread.join(timeout=5.0)
        self._deliver(0.0)

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self._deliver(1.0):
                return

    def _deliver(self, timeout_s: float) -> bool:
        """Wait up to timeout_s for a new update and pass it on; False when the actor is gone."""
        try:
            got = ray.get(self.status.next_progress.remote(self.seen, timeout_s))
        except ray.exceptions.RayError:
            return False
        if got is not None and got[0] > self.seen:
            self.seen = got[0]
            self.on_step(got[1])
        return True
