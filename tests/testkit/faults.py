"""Failure drills for the tests, as a `diffray.trainers.hooks` plugin loaded by path on every Ray worker.

`fault_env(**drills)` gives the environment that turns them on (the driver passes DIFFRAY_HOOK* on to
the workers). Drills, all optional:
    kill_rank_at_step={"rank": R, "step": S}   SIGKILL rank R's worker once, before step S; with
                                                "registered": C, first wait until Ray has registered the
                                                run's checkpoint of step C (it does so asynchronously), so
                                                a restart resumes from C, not from an older one
    nan_loss_at_step=S                          every rank's loss of step S is NaN
    kill_during_checkpoint_at_step=S            SIGKILL rank 0 once, after it wrote step S's checkpoint
                                                files and before it reported them
    kill_reward_actor_at_step=E                 DDPO: the reward actor of rank 0's first batch of epoch E
                                                is killed (Ray restarts it) while that batch waits in it
"Once": a marker file under the run's log dir, so a restarted worker group does not fire it again.

Self-contained on purpose: workers load this file by path, without the tests on their sys.path.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from diffray.trainers.hooks import Hooks

SPEC_ENV = "DIFFRAY_HOOK_FAULTS"


def fault_env(**drills) -> dict[str, str]:
    """Environment variables that load this plugin with `drills`."""
    return {"DIFFRAY_HOOKS": str(Path(__file__).resolve()), SPEC_ENV: json.dumps(drills)}


def kill_self_once(log_dir: str, name: str) -> None:
    marker = Path(log_dir) / "faults" / name
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def wait_registered(log_dir: str, step: int, timeout: float = 300) -> None:
    """Until the run's checkpoint_manager_snapshot.json (beside its logs) names a checkpoint of `step` or
    later: Ray writes it when the controller registers a reported checkpoint."""
    snapshot = Path(log_dir).parent / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"] >= step:
                return
        except (OSError, ValueError, KeyError, TypeError):  # not written yet, or caught mid-write
            pass
        time.sleep(0.1)
    raise RuntimeError(f"fault drill: the checkpoint of step {step} was not registered within {timeout}s")


class FaultDrills(Hooks):
    def __init__(self, spec: dict):
        self.spec = spec

    def before_step(self, rank: int, step: int, log_dir: str) -> None:
        k = self.spec.get("kill_rank_at_step")
        if k and (k["rank"], k["step"]) == (rank, step):
            if k.get("registered") and not (Path(log_dir) / "faults" / f"rank{rank}-step{step}").exists():
                wait_registered(log_dir, k["registered"])
            kill_self_once(log_dir, f"rank{rank}-step{step}")

    def loss(self, step: int, loss):
        return loss * float("nan") if self.spec.get("nan_loss_at_step") == step else loss

    def checkpoint_written(self, rank: int, step: int, log_dir: str) -> None:
        if rank == 0 and self.spec.get("kill_during_checkpoint_at_step") == step:
            kill_self_once(log_dir, f"checkpoint-{step}")

    def _reward_drill(self, rank: int, epoch: int, batch: int) -> bool:
        return rank == 0 and batch == 0 and self.spec.get("kill_reward_actor_at_step") == epoch

    def before_reward_call(self, rank: int, epoch: int, batch: int, actor) -> None:
        if self._reward_drill(rank, epoch, batch):
            def block(_actor_self):  # nested, so it is pickled by value (this module is not importable there)
                threading.Event().wait()

            actor.__ray_call__.remote(block)  # the actor is busy: the batch sent next waits in it

    def after_reward_call(self, rank: int, epoch: int, batch: int, actor) -> None:
        if self._reward_drill(rank, epoch, batch):
            import ray

            ray.kill(actor, no_restart=False)  # the waiting call fails with RayActorError; Ray restarts the actor


HOOKS = FaultDrills(json.loads(os.environ.get(SPEC_ENV) or "{}"))
