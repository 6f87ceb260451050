"""A replica's pipeline side (`Drawing`): the image engine, the batcher and the resident adapter sets
Serve multiplexes. The Generator deployment wraps one; with `generator.in_ingress` each Ingress replica
holds its own (`deployments`).
"""

from __future__ import annotations

import asyncio
import threading
import time

from ray import serve

from diffray.serve.batcher import Batcher
from diffray.serve.schemas import Job


class AdapterSet:
    """A multiplexed "model": a set of adapters held resident in the engine until Serve evicts it."""

    def __init__(self, engine, ids: list):
        self.engine, self.ids, self.live = engine, ids, False
        engine.acquire(ids)
        self.live = True

    def __del__(self):  # Serve calls this on LRU eviction (in a thread); later calls do nothing. Never raises.
        if getattr(self, "live", False):
            self.live = False
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # a plain thread: release here
                self.engine.release(self.ids)
            else:  # dropped on the event loop (a load whose caller was cancelled): the engine lock may be held
                # by a running batch for seconds, so wait for it on a thread of its own, not on the loop
                threading.Thread(target=self.engine.release, args=(self.ids,), name="diffray-release",
                                 daemon=True).start()


class Drawing:
    """A replica's pipeline side: the engine, the batcher and the resident adapter sets. The Generator
    deployment wraps one; with `generator.in_ingress` each Ingress replica holds its own. Requests of the
    same shape share a pipeline call (`Batcher`, then the engine's grouping: same adapters, or one mixable
    LoRA each)."""

    def __init__(self, args):
        import torch

        from diffray.serve.engine import ImageEngine

        self.args = args
        if args.generator.torch_threads:
            torch.set_num_threads(args.generator.torch_threads)
        self.engine = ImageEngine(args)
        b = args.batching
        self.batcher = Batcher(self.engine.run, b.max_batch_size if b.enabled else 1,
                               b.batch_wait_timeout_s if b.enabled else 0.0)
        engine = self.engine

        async def load_adapters(key: str) -> AdapterSet:
            return await asyncio.to_thread(AdapterSet, engine, key.split("+"))

        self.adapter_set = serve.multiplexed(max_num_models_per_replica=args.generator.max_adapters_per_replica)(
            load_adapters)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    async def generate(self, job: Job, key: str) -> dict:
        """The job's images, its replica and timing; `key` is the job's adapter set ("" for none). A
        cancelled caller (timeout, client gone) has its job abandoned at the next sampler step."""
        if job.timeout_s > 0:  # a backstop on this process's own clock, should the caller's cancel never arrive
            job.deadline = time.monotonic() + 2 * job.timeout_s
        t0 = time.perf_counter()
        if key:
            await self.adapter_set(key)
        adapters_s = time.perf_counter() - t0
        try:
            result, timing = await self.batcher.submit_timed(job)
        except asyncio.CancelledError:  # the caller gave up: stop the pipeline at its next step
            self.engine.cancel(job.job_id)
            raise
        if isinstance(result, BaseException):  # this job's own failure; its batch-mates are unaffected
            raise result
        return {"images": result, "replica": self.replica_id, "resident": sorted(self.engine.adapters.loaded),
                "timing": {"adapters": adapters_s, "queue": timing.queued_s, "engine": timing.run_s,
                           "batch": timing.batch_size}}

    def info(self) -> dict:
        return {"replica": self.replica_id, **self.engine.info()}
