"""What the CLI draws while a job runs: one live progress line on a terminal, plain lines otherwise.

`TrainProgress` is fed rank 0's numbers after every step (`runner.run_training(on_progress=...)`): on a
terminal it redraws one line in place (step, loss, lr, samples/s, ETA); without one it prints a plain
line each time the step passes a multiple of `every`, so logs of CI and `ray job submit` stay readable.
The driver sees only the latest step when several finish between two looks (`trainers.progress`), so
the line is for the first step seen past each multiple, not only for the multiple itself. `TuneProgress`
prints a line per trial. Never imports Ray or torch.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, TextIO


def eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class TrainProgress:
    """Training progress of `total` steps on `stream`: on a terminal one bar redrawn in place (`\\r`), else
    a plain line for the first step seen past each multiple of `every`, and for the last step."""

    BAR = 20  # characters of the bar itself

    def __init__(self, total: int, stream: TextIO | None = None, tty: bool | None = None, every: int | None = None):
        self.total, self.stream = total, stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every = every or max(1, total // 10)
        self.t0: float | None = None
        self.first = 0
        self.shown = 0  # the step of the last plain line (before the first: the step before the first seen)
        self.drawn = False

    def __call__(self, metrics: dict[str, Any]) -> None:
        step, now = int(metrics["step"]), time.monotonic()
        if self.t0 is None:  # the first step seen (a resumed run starts later): ETA from here on
            self.t0, self.first = now, step - 1
            self.shown = self.first
        rate = (step - self.first) / max(now - self.t0, 1e-9)
        text = (f"loss={metrics.get('loss', float('nan')):.4f} lr={metrics.get('lr', 0.0):.2e} "
                f"{metrics.get('samples_per_s', 0.0):.1f} samples/s eta {eta((self.total - step) / max(rate, 1e-9))}")
        if self.tty:
            done = min(self.BAR, self.BAR * step // max(self.total, 1))
            line = f"train {step}/{self.total} |{'█' * done}{' ' * (self.BAR - done)}| {text}"
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.stream.write("\r" + line[:width].ljust(width))
            self.stream.flush()
            self.drawn = True
        elif step // self.every > self.shown // self.every or (step == self.total and self.shown != step):
            print(f"step {step}/{self.total} {text}", file=self.stream, flush=True)
            self.shown = step

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


class TuneProgress:
    """One line per trial that ends (finished, stopped early or failed), with the best metric so far;
    `record` is what `tune.runner.run_tune(on_trial=...)` calls."""

    def __init__(self, metric: str, mode: str, stream: TextIO | None = None):
        self.metric, self.sign = metric, (1.0 if mode == "min" else -1.0)
        self.stream = stream or sys.stderr
        self.best: float | None = None
        self.done = 0

    def record(self, trial_id: str, result: dict[str, Any] | None, how: str) -> None:
        value = (result or {}).get(self.metric)
        if value is not None and (self.best is None or self.sign * value < self.sign * self.best):
            self.best = value
        self.done += 1
        best = f" (best {self.metric}={self.best:.6g})" if self.best is not None else ""
        shown = f"{self.metric}={value:.6g}" if value is not None else "no result"
        print(f"trial {trial_id} {how} at step {(result or {}).get('step', '?')}: {shown}; {self.done} done{best}",
              file=self.stream, flush=True)


def train_progress(cfg) -> TrainProgress | None:
    """The driver's progress display of a training job (None when `train.progress_bar` is off)."""
    return TrainProgress(cfg.train.max_steps) if cfg.train.progress_bar else None


def run_with_progress(cfg):
    """`run_training` with the progress display; returns the result."""
    from diffray.trainers.runner import run_training

    progress = train_progress(cfg)
    try:
        return run_training(cfg, on_progress=progress)
    finally:
        if progress is not None:
            progress.close()
