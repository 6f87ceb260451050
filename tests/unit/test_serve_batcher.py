"""The Generator's batcher: jobs waiting together go in one engine call (up to max_size, whatever their
adapters), a caller that gave up before its batch started is left out, each caller gets its own entry."""

from __future__ import annotations

import asyncio
import threading

from diffray.serve.batcher import Batcher


class Engine:
    """Records each batch; the first call blocks until `release` is set, so later jobs queue meanwhile."""

    def __init__(self):
        self.batches: list[list] = []
        self.started, self.release = threading.Event(), threading.Event()

    def run(self, jobs: list) -> list:
        self.batches.append(list(jobs))
        self.started.set()
        self.release.wait(30)
        return [ValueError(j) if j == "bad" else j.upper() for j in jobs]


async def until(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 30)


def test_jobs_that_wait_together_share_a_call_up_to_max_size():
    async def main(engine):
        batcher = Batcher(engine.run, max_size=3, wait_s=0.0)
        first = asyncio.create_task(batcher.submit("a"))
        await until(engine.started)  # "a" runs alone; the next five queue behind it
        rest = [asyncio.create_task(batcher.submit(j)) for j in ("b", "bad", "d", "e", "f")]
        while batcher.queue.qsize() < 5:
            await asyncio.sleep(0)
        engine.release.set()
        return await first, await asyncio.gather(*rest)

    engine = Engine()
    first, rest = asyncio.run(main(engine))
    assert engine.batches == [["a"], ["b", "bad", "d"], ["e", "f"]]
    assert first == "A" and rest[0] == "B" and isinstance(rest[1], ValueError) and rest[2:] == ["D", "E", "F"]


def test_a_caller_that_gave_up_before_its_batch_started_is_left_out():
    async def main(engine):
        batcher = Batcher(engine.run, max_size=8, wait_s=0.0)
        first = asyncio.create_task(batcher.submit("a"))
        await until(engine.started)
        gone, kept = asyncio.create_task(batcher.submit("gone")), asyncio.create_task(batcher.submit("kept"))
        while batcher.queue.qsize() < 2:
            await asyncio.sleep(0)
        gone.cancel()
        engine.release.set()
        return await first, await kept

    engine = Engine()
    assert asyncio.run(main(engine)) == ("A", "KEPT")
    assert engine.batches == [["a"], ["kept"]]


def test_a_batch_waits_up_to_wait_s_for_more_jobs():
    async def main(engine):
        engine.release.set()
        batcher = Batcher(engine.run, max_size=2, wait_s=30.0)  # closes when full, long before 30 s
        a = asyncio.create_task(batcher.submit("a"))
        await asyncio.sleep(0)
        return await asyncio.gather(a, batcher.submit("b"))

    engine = Engine()
    assert asyncio.run(main(engine)) == ["A", "B"]
    assert engine.batches == [["a", "b"]]


def test_each_job_is_told_how_long_it_queued_and_how_long_its_batch_ran():
    async def main(engine):
        loop = asyncio.get_running_loop()
        batcher = Batcher(engine.run, max_size=3, wait_s=0.0)
        first = asyncio.create_task(batcher.submit_timed("a"))
        await until(engine.started)  # "a" runs (blocked); "b" and "c" queue behind it
        a_running = loop.time()
        rest = [asyncio.create_task(batcher.submit_timed(j)) for j in ("b", "c")]
        while batcher.queue.qsize() < 2:
            await asyncio.sleep(0)
        queued = loop.time()
        await asyncio.sleep(0.02)  # not a synchronisation: a known least time for "b" and "c" in the queue
        released = loop.time()
        engine.release.set()
        return await first, await asyncio.gather(*rest), a_running, queued, released

    engine = Engine()
    (a, ta), [(b, tb), (c, tc)], a_running, queued, released = asyncio.run(main(engine))
    assert (a, b, c) == ("A", "B", "C") and engine.batches == [["a"], ["b", "c"]]
    assert (ta.batch_size, tb.batch_size, tc.batch_size) == (1, 2, 2)
    assert ta.run_s >= released - a_running >= 0.02  # "a"'s call lasted at least until it was released
    assert tb.run_s == tc.run_s >= 0  # one call, shared by the batch
    # "b" and "c" were queued before "a" was released, and their batch started after "a"'s call returned
    assert min(tb.queued_s, tc.queued_s) >= released - queued >= 0.02
    assert 0 <= ta.queued_s < ta.run_s


def test_timings_are_finer_than_a_uvloop_millisecond():
    """Serve's replicas run uvloop, whose loop.time() moves in whole milliseconds: the Server-Timing parts
    the batcher reports (queue, engine) were whole ms, and summed past the call that held them."""
    import time

    import uvloop

    def run(jobs):
        time.sleep(0.0004)
        return jobs

    async def main():
        b = Batcher(run, max_size=1, wait_s=0.0)
        return [(await b.submit_timed(i))[1] for i in range(10)]

    timings = uvloop.run(main())
    assert all(0.0004 <= t.run_s < 0.5 for t in timings), [t.run_s for t in timings]
