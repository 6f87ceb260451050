"""DDPO's reward actor pool: the images of each sampling batch go, without waiting, to a pool of Ray
actors that hold the built reward (a model-based one loads its model once), so the next batch samples
while the last is scored. Rank 0 creates named actors (owned by it, so they end with the worker
group) and every rank uses them; a call whose actor died is resubmitted to the restarted actor.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from diffray.errors import TrainingError
from diffray.trainers import session
from diffray.trainers.components.rewards import get_reward


@ray.remote
class RewardActor:
    """Holds one built reward (a model-based one loads its model once) and scores image batches."""

    def __init__(self, name: str, options: dict[str, Any], threads: int):
        torch.set_num_threads(threads)
        self.reward = get_reward(name, **options)

    def ready(self) -> bool:
        return True

    def restarted(self) -> bool:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        return self.reward(images, prompts, None)


@dataclass
class PendingScore:
    """A batch handed to the pool: the actor's ObjectRef (or the inline result) and what to resubmit."""

    actor: int
    ref: Any
    images: np.ndarray
    prompts: list[str]


class RewardPool:
    """Scores image batches on a pool of Ray actors, round-robin and asynchronously, or inline on the
    worker when the pool is empty. A call whose actor died (RayActorError) is resubmitted to the same,
    restarted actor up to `retries` times."""

    def __init__(self, actors: list, reward_fn, retries: int, offset: int = 0):
        self.actors, self.reward_fn, self.retries = actors, reward_fn, retries
        self.next = offset
        self.resubmitted = 0

    def next_actor(self):
        """The actor the next `submit` goes to (None when scoring inline)."""
        return self.actors[self.next % len(self.actors)] if self.actors else None

    def submit(self, images: np.ndarray, prompts: list[str]) -> PendingScore:
        if not self.actors:
            return PendingScore(-1, self.reward_fn(images, prompts, None), images, prompts)
        i = self.next % len(self.actors)
        self.next += 1
        return PendingScore(i, self.actors[i].score.remote(images, prompts), images, prompts)

    def result(self, pending: PendingScore) -> np.ndarray:
        if pending.actor < 0:
            return pending.ref
        for attempt in range(self.retries + 1):
            try:
                return np.asarray(ray.get(pending.ref), dtype=np.float32)
            except ray.exceptions.RayActorError as exc:
                if attempt == self.retries:
                    raise TrainingError(f"reward actor {pending.actor} died {attempt + 1} times scoring one batch "
                                        f"({type(exc).__name__}); raise ddpo.reward.retries/max_restarts") from None
                self.resubmitted += 1
                pending.ref = self.actors[pending.actor].score.remote(pending.images, pending.prompts)
        raise AssertionError("unreachable")

    def restarted_actors(self) -> int:
        """How many of the pool's actors have been restarted at least once."""
        return sum(ray.get([a.restarted.remote() for a in self.actors])) if self.actors else 0


def open_reward_pool(r, env: session.WorkerEnv) -> RewardPool:
    """The reward pool shared by all ranks (`r`: the `ddpo.reward` section): rank 0 creates named actors
    (owned by it, so they end with the worker group) and the others look them up; inline scoring when
    `r.actors` is 0."""
    if r.actors == 0:
        return RewardPool([], get_reward(r.name, **r.options), r.retries)
    prefix = session.broadcast_from_main(f"diffray-ddpo-reward-{uuid.uuid4().hex[:12]}" if env.is_main else None)
    names = [f"{prefix}-{i}" for i in range(r.actors)]
    if env.is_main:
        # "DEFAULT": the pool takes its own resources, never a bundle of an enclosing placement group
        # (inside a Tune trial, child actors would otherwise be captured by the trial's group and wait).
        opts = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_restarts=r.max_restarts, max_task_retries=0,
                    scheduling_strategy="DEFAULT")
        actors = [RewardActor.options(name=n, **opts).remote(r.name, r.options, max(1, int(r.num_cpus)))
                  for n in names]
        try:
            ray.get([a.ready.remote() for a in actors], timeout=r.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TrainingError(f"{r.actors} reward actor(s) of {r.num_cpus:g} CPU / {r.num_gpus:g} GPU did not start "
                                f"in {r.start_timeout_s:g}s: the cluster has no room beside the training workers; "
                                "lower ddpo.reward.num_cpus/num_gpus or scaling.cpus_per_worker") from None
    if dist.is_initialized():
        dist.barrier()
    if not env.is_main:
        actors = [ray.get_actor(n) for n in names]
    return RewardPool(actors, None, r.retries, offset=env.rank)
