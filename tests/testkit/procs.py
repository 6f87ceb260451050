"""Stopping the servers and CLIs the tests start in their own process group."""

from __future__ import annotations

import os
import signal
import subprocess


def interrupt_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Ctrl-C to the process group (as a person stops `serve run`), SIGKILL after `timeout` seconds."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
