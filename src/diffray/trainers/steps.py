"""`StepTask`: the defaults a task that trains one optimizer step per loop step shares (denoisers, the
VAE): accumulation and schedule length from `train`, no extra trainer state or metrics, no raw-weights
export. Plain Python; see `diffray.trainers.loop.Task` for the protocol."""

from __future__ import annotations

from pathlib import Path


class StepTask:
    grid_path = "validation/step_{step:06d}.png"  # under the run's log dir
    grid_tag = "validation"
    collective_grid = False  # True: every rank must take part in rendering (it gathers across ranks)
    step_reports = False  # True: a Tune trial reports every step (not only at validation steps)
    cfg = None  # the job config, set by the subclass

    @property
    def grad_accum_steps(self) -> int:
        return self.cfg.train.grad_accum_steps

    @property
    def optimizer_steps(self) -> int:
        return self.cfg.train.max_steps

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def report_metrics(self) -> dict:
        return {}

    def export_raw(self, artifact: Path) -> None:
        """With EMA on: the trained weights beside the EMA artifact, where the format has a place for them
        (none by default: an adapter file or a single model dir holds one set)."""
