"""Waiting for an event (a file, a log line, a listening port, a replica state) with a deadline.

Tests synchronise through `wait_until` only: it polls a condition and fails the test with a message
naming what never happened. It must never be used to "give something time": every call waits for a
condition that the test then relies on.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(ready: Callable[[], T], what: str, timeout: float = 120, interval: float = 0.2,
               alive: Callable[[], None] | None = None) -> T:
    """Polls `ready()` until it returns something truthy and returns that value.

    Args:
        ready: the condition; exceptions of type OSError/ValueError count as "not yet" (a server that
            is not listening, a file half written).
        what: what is awaited, for the failure message.
        timeout: seconds before the test fails.
        interval: seconds between polls (the poll rate, not a synchronisation delay).
        alive: called before each poll; it raises (e.g. an AssertionError with a process's log) when
            the thing being waited on has died, so a crash fails at once instead of at the deadline.

    Raises:
        AssertionError: `what` did not happen within `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if alive is not None:
            alive()
        try:
            value = ready()
        except (OSError, ValueError) as exc:
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                                 + (f" (last error: {last_error})" if last_error else ""))
        time.sleep(interval)
