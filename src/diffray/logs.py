"""What a person sees, and where everything else goes.

Library code logs through `logging` (loggers under `diffray`) and never prints. The CLI decides what
reaches the terminal (`configure_cli`): diffray's own INFO lines (data summaries, results, paths) as
plain text on stderr. Ray's, Ray Data's, Ray Train's, Tune's, Serve's and DeepSpeed's own output is
moved off the terminal with their own settings (`quiet_libraries`, and `log_to_driver` in
`diffray.cluster.connect_ray`) and written to the run's log files (`attach_run_log` on the driver,
`setup_worker` on each Ray Train worker); their errors still reach the terminal. `--verbose` or
`DIFFRAY_VERBOSE=1` brings their own output back.

Never imports Ray or torch at module level.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

VERBOSE_ENV = "DIFFRAY_VERBOSE"
# The libraries' loggers whose terminal handlers are quieted, and the loggers that get the run's file
# handler (those that do not propagate; ray.train, ray.tune and ray.serve records reach "ray").
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "DeepSpeed")
FILE_LOGGERS = ("diffray", "ray", "ray.data", "DeepSpeed")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("diffray")


def verbose() -> bool:
    """True when the user asked for the libraries' own output (`--verbose`, DIFFRAY_VERBOSE=1)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def configure_cli(verbose_output: bool) -> None:
    """The CLI's terminal: diffray's INFO lines plain on stderr; other libraries' records through their
    own handlers (quieted by `quiet_libraries` once they are imported)."""
    if verbose_output:
        os.environ[VERBOSE_ENV] = "1"  # Ray workers and Serve replicas inherit it (see cluster.worker_env_vars)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PlainFormatter())
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if not verbose():
        # DeepSpeed warns about its accelerator while it is being imported (transformers imports it), before
        # its handler exists for `quiet_libraries` to quiet: on the driver its logger passes errors only
        # (the workers' DeepSpeed records go to their log files, see `setup_worker`).
        logging.getLogger("DeepSpeed").addFilter(IMPORT_QUIET)


class PlainFormatter(logging.Formatter):
    """INFO lines as they are; warnings and errors prefixed as the CLI's own messages are."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"diffray: error: {text}"
        return f"diffray: warning: {text}" if record.levelno >= logging.WARNING else text


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


IMPORT_QUIET = _errors_only


def quiet_libraries() -> None:
    """Unless verbose: the terminal handlers of Ray's, Ray Data's, Ray Train's, Tune's, Serve's and
    DeepSpeed's loggers pass errors only (their file handlers keep everything)."""
    level = logging.NOTSET if verbose() else logging.ERROR
    for name in LIBRARY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(level)


def attach_run_log(path: str | Path) -> logging.Handler:
    """Also write diffray's and the libraries' records (INFO and up) to `path`; returns the handler for
    `detach_run_log`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(logging.INFO)
    for name in FILE_LOGGERS:
        logging.getLogger(name).addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    return handler


def detach_run_log(handler: logging.Handler) -> None:
    for name in FILE_LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()


def setup_worker(log_dir: str, rank: int) -> None:
    """On a Ray Train worker: its records (diffray, Ray Train, DeepSpeed, ...) go to `worker-<rank>.log` in
    the run's log dir; the terminal stays the driver's."""
    path = Path(log_dir) / f"worker-{rank}.log"
    if any(getattr(h, "baseFilename", None) == str(path) for h in log.handlers):
        return  # a restarted loop in the same worker process
    attach_run_log(path)
    quiet_libraries()


def quiet_hf() -> None:
    """Silence per-file progress bars of diffusers/transformers loads, and (unless verbose) their notes
    below errors (e.g. "no LoRA keys for the text encoder" when an adapter has none)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()
    if not verbose():
        dlog.set_verbosity_error()
