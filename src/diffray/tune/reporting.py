"""How a trial's Train run reports to Tune: through the trial function's own thread.

Ray's `TuneReportCallback` hands each report to the trial actor's main thread through an inter-actor queue,
and that thread re-reports it into the function trainable's result queue. We saw that path deadlock on
2 CPUs (the main thread blocked in `_report_training_result`'s `result_queue.put`, the result queue already
full, the training thread finished; test_tune.py's TPE search hung in 2 of 3 slow-suite runs). Here the
Train controller's callback only puts rank 0's metrics (and the checkpoint's path, as Ray's callback does)
into a plain Ray queue, and the trial function, which runs `trainer.fit()` in a helper thread, takes them
from it and calls `tune.report` itself: the ordinary function-trainable path, one reporter, in order.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue

CHECKPOINT_PATH_KEY = "checkpoint_path"  # as Ray's TuneReportCallback names it
POLL_S = 0.2  # how long one get waits before checking whether fit() is done


class ForwardReports(UserCallback):
    """Runs in the Train controller: every report of rank 0 (with its checkpoint's path) into `queue`."""

    def __init__(self, reports: Queue):
        self.reports = reports

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        item = dict(metrics[0])
        if checkpoint:
            item[CHECKPOINT_PATH_KEY] = checkpoint.path
        self.reports.put(item)


def fit_reporting(fit: Callable[[], Any], reports: Queue, report: Callable[[dict], None]) -> Any:
    """Run `fit()` in a helper thread and `report` every item of `reports` from this thread, in order,
    until fit has returned and the queue is drained. Returns fit's result or raises its exception.
    When Tune stops the trial, `report` raises SystemExit here; the helper thread is a daemon and the
    trial actor (with the Train controller it owns) is torn down by Tune."""
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["result"] = fit()
        except BaseException as exc:  # re-raised in the trial's thread below
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="diffray-trial-fit", daemon=True).start()
    while True:
        finished = done.is_set()  # read before the get: a report put before fit returned is still taken
        try:
            item = reports.get(block=True, timeout=POLL_S)
        except (Empty, queue.Empty):
            if finished:
                break
            continue
        report(item)
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("result")
