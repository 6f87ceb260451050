"""Dynamic batching inside a Generator replica, across adapters.

Serve's `@serve.batch` splits every batch by multiplexed model id (Ray 2.60 `_split_batch_by_model_id`),
so requests for different adapters would never meet in one engine call, and mixed-adapter batching
(`mixing`) could not happen. This batcher does what `@serve.batch` did here, without the split: the first
waiting job opens a batch, which closes when it holds `max_size` jobs or `wait_s` after it opened; the
engine runs it in a worker thread (the event loop keeps accepting requests) and batches run one at a time
(the engine holds one lock anyway). A caller that went away before its batch started is left out; one that
goes away while it runs is cancelled by the Generator through the engine (`ImageEngine.cancel`).
Never imports ray.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Timing:
    """Where one job's time in the batcher went (seconds): waiting for its batch to start, and the batch's
    `run` call, which every job of the batch shares."""

    queued_s: float
    run_s: float
    batch_size: int  # jobs handed to `run` together (the engine may split them into several pipeline calls)


class Batcher:
    """`await submit(job)` returns the job's entry of `run(jobs)`: a result, or an exception object;
    `submit_timed` returns it with its `Timing`."""

    def __init__(self, run: Callable[[list], list], max_size: int, wait_s: float):
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def submit(self, job) -> Any:
        return (await self.submit_timed(job))[0]

    async def submit_timed(self, job) -> tuple[Any, Timing]:
        if self.task is None:  # created on the loop that serves the requests
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._loop())
        # timings on perf_counter: a uvloop loop's time() (Serve's replicas) moves in whole milliseconds
        future, submitted = asyncio.get_running_loop().create_future(), time.perf_counter()
        self.queue.put_nowait((job, future))
        result, started, run_s, size = await future
        return result, Timing(started - submitted, run_s, size)

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        closes = loop.time() + self.wait_s
        while len(batch) < self.max_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = closes - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return [(job, fut) for job, fut in batch if not fut.done()]  # callers that gave up are left out

    async def _loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.run, [job for job, _ in batch])
            except Exception as exc:  # noqa: BLE001 - the engine answers per job; this is a bug's last resort
                results = [exc] * len(batch)
            run_s = time.perf_counter() - started
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result((result, started, run_s, len(batch)))
