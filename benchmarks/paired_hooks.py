"""A `DIFFRAY_HOOKS` plugin for `train_overhead.py --paired`: before each optimizer step, rank 0 of the Ray
Train worker says it is ready (a line on the FIFO `$DIFFRAY_HOOK_PAIR_DIR/ready`) and waits for its turn (a line
on `.../go`), so the benchmark's plain loops run one step each between every two of the worker's. The wait is
before the worker starts timing its step."""

from __future__ import annotations

import os

from diffray.trainers.hooks import Hooks


class TakeTurns(Hooks):
    def __init__(self):
        self.ready = self.go = None

    def before_step(self, rank: int, step: int, log_dir: str) -> None:
        if rank != 0:
            return
        pair_dir = os.environ["DIFFRAY_HOOK_PAIR_DIR"]
        if self.ready is None:  # the benchmark holds `ready` open to read; it opens `go` once this line came
            self.ready = open(os.path.join(pair_dir, "ready"), "w", buffering=1)
        self.ready.write(f"{step}\n")
        if self.go is None:
            self.go = open(os.path.join(pair_dir, "go"))
        if not self.go.readline():
            raise RuntimeError("train_overhead.py --paired: the benchmark closed its turn pipe")


HOOKS = TakeTurns()
