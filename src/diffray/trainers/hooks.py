"""A generic hook point in the worker-side training code; every hook does nothing unless a plugin is named.

`DIFFRAY_HOOKS=/path/to/plugin.py` makes `current()` load that file once per process and return its
`HOOKS` object; the driver passes every `DIFFRAY_HOOK*` variable on to the Ray workers (see
`diffray.cluster.worker_env_vars`). The test suite's failure drills (kill a rank, NaN loss, kill during a
checkpoint write, kill a reward actor) are such a plugin (`tests/testkit/faults.py`). Production code
calls the hooks at fixed points and must never depend on what they do.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

ENV = "DIFFRAY_HOOKS"


class Hooks:
    """The hook points, all no-ops. A plugin subclasses this and overrides what it needs."""

    def before_step(self, rank: int, step: int, log_dir: str) -> None:
        """A worker is about to run optimizer step `step` (1-based)."""

    def loss(self, step: int, loss: Any) -> Any:
        """The loss of a micro-batch of `step`, before it is averaged over ranks; returns the loss to use."""
        return loss

    def checkpoint_written(self, rank: int, step: int, log_dir: str) -> None:
        """A worker has written its part of step `step`'s checkpoint and has not reported it yet."""

    def before_reward_call(self, rank: int, epoch: int, batch: int, actor: Any) -> None:
        """DDPO: batch `batch` of `epoch` is about to be sent to the reward actor `actor`."""

    def after_reward_call(self, rank: int, epoch: int, batch: int, actor: Any) -> None:
        """DDPO: that batch has been sent (its result is not awaited yet)."""


_current: Hooks | None = None


def current() -> Hooks:
    """The process's hooks: the plugin named by $DIFFRAY_HOOKS, else the no-op `Hooks()`."""
    global _current
    if _current is None:
        _current = load(os.environ.get(ENV))
    return _current


def load(path: str | None) -> Hooks:
    """The `HOOKS` object of the plugin file at `path` (no-op hooks when `path` is empty)."""
    if not path:
        return Hooks()
    spec = importlib.util.spec_from_file_location("diffray_hooks_plugin", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{ENV}={path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HOOKS
