"""The one per-worker training loop every method runs: setup -> train -> save -> cleanup.

A method supplies a `Task` (what it trains and how one optimizer step goes: a denoising step over
micro-batches, or a whole DDPO epoch); this module owns everything around the step, once: the engine,
resume, the hook point, NaN/inf stop, logging and progress, held-out losses, validation grids, Tune
reports, checkpoints, the artifact in the final checkpoint and the closing barrier.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import ray
import torch
import torch.distributed as dist

from diffray import logs, storage
from diffray.trainers import checkpoints, hooks, session, tracking
from diffray.trainers.engine import build_engine

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a training method plugs into the loop (built on every worker); see `denoising.DenoisingTask`."""

    module: torch.nn.Module  # what the engine wraps; its requires_grad params are trained
    grad_accum_steps: int  # micro-steps the engine accumulates into one optimizer step
    optimizer_steps: int  # optimizer steps in the whole run (the LR schedule's length)
    grid_path: str  # where validation grids go under the log dir, formatted with `step`
    grid_tag: str  # their TensorBoard tag
    collective_grid: bool  # every rank renders (gathers across ranks), not just rank 0
    step_reports: bool  # a Tune trial reports every step, not only when a val_loss is computed

    def start(self, engine, state: dict) -> None:
        """Open streams / restore what the task keeps in the trainer state, after a resume too."""

    def train_step(self, engine, step: int) -> session.StepOutput:
        """One optimizer step (forward, backward, engine.step); raises `session.NonFiniteLoss` on every
        rank at once when the loss is not finite."""

    def state(self) -> dict:
        """Extra fields of the trainer state (saved in every checkpoint)."""

    def load_state(self, state: dict) -> None:
        """Restore the extra fields of a resumed trainer state."""

    def report_metrics(self) -> dict:
        """Extra metrics of every report (checkpoint metrics, Tune, the card)."""

    def validation_loss(self, engine, batch: dict) -> torch.Tensor:
        """Mean loss of a held-out micro-batch at fixed noise/timesteps (under no_grad, eval mode)."""

    def validation_grid(self, step: int):
        """A PIL grid from the current weights, or None (on ranks that only took part)."""

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        """Write the method's artifact into out_dir (rank 0, trainable weights gathered; the EMA weights
        when `train.ema_decay` is on)."""

    def export_raw(self, artifact: Path) -> None:
        """With EMA on: add the trained (non-EMA) weights to the artifact, where the format has a place for
        them (full fine-tuning: the diffusers `non_ema` variant); nothing otherwise."""


@dataclass(frozen=True)
class RunInfo:
    """What the driver sends beside the config (see `runner.build_trainer`)."""

    model_path: str
    log_dir: str
    status: Any  # the run's RunStatus actor, or None
    has_validation: bool  # a `validation` dataset exists
    report_validation: bool  # a Tune trial: report every metric the scheduler may act on
    logs_uri: str | None = None  # a run on object storage: where its logs are uploaded (at each checkpoint)

    @classmethod
    def of(cls, config: dict) -> RunInfo:
        return cls(config["model_path"], config["log_dir"], config.get("status_actor"),
                   config.get("has_validation", False), config.get("report_validation", False),
                   config.get("logs_uri"))


def train_loop_per_worker(config: dict) -> None:
    """Every method's Ray Train worker function: `config["method"]` is the method's declaration, and
    `config["cfg"]` its job config as plain data (re-validated here)."""
    method = config["method"]
    cfg = method.config.model_validate(config["cfg"])
    info = RunInfo.of(config)
    env = session.worker_env(cfg.train.mixed_precision, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker)
    logs.setup_worker(info.log_dir, env.rank)
    task = method.task()(cfg, info.model_path, env)
    WorkerLoop(cfg, info, env, task).run()


class WorkerLoop:
    """The loop over optimizer steps on one worker (all ranks run it in lockstep)."""

    def __init__(self, cfg, info: RunInfo, env: session.WorkerEnv, task: Task):
        self.cfg, self.info, self.env, self.task = cfg, info, env, task
        t = cfg.train
        self.engine = build_engine(task.module, cfg.strategy, cfg.optim, t.micro_batch_size, task.grad_accum_steps,
                                   task.optimizer_steps, env.precision, env.device)
        if t.ema_decay is not None:
            self.engine.attach_ema(t.ema_decay, t.ema_on_cpu)
        self.state = checkpoints.restore(self.engine, env, info.status) or session.initial_state()
        task.load_state(self.state)
        task.start(self.engine, self.state)
        trackers = tracking.open_trackers(cfg.tracking, cfg.run.name, cfg.model_dump(mode="json"),
                                          info.log_dir) if env.is_main else []
        self.logger = session.MetricsLogger(info.log_dir, env.is_main, self.state["step"], trackers)

    def run(self) -> None:
        start = self.state["step"]
        self.logger.event(event="start", method=self.cfg.method, resumed_from_step=start,
                          world_size=self.env.world_size, precision=self.env.precision,
                          strategy=self.cfg.strategy.name, zero_stage=self.cfg.strategy.zero_stage)
        try:
            for step in range(start + 1, self.cfg.train.max_steps + 1):
                self.step(step)
        except session.NonFiniteLoss as exc:
            self.stop(exc)
            return
        self.logger.event(event="end", step=self.state["step"])
        self.logger.close()
        if dist.is_initialized():
            dist.barrier()

    def stop(self, exc: session.NonFiniteLoss) -> None:
        """Every rank stops at the same step and returns normally (raising would make Ray retry the same
        divergence); the driver reads the step from the status actor and reports it."""
        self.logger.event(event="nonfinite_loss", step=exc.step, loss=exc.loss)
        if self.env.is_main and self.info.status is not None:
            ray.get(self.info.status.set.remote("nonfinite_loss_step", exc.step))
        self.logger.close()

    def step(self, step: int) -> None:
        cfg, env, task = self.cfg, self.env, self.task
        hooks.current().before_step(env.rank, step, self.info.log_dir)
        session.seed_step(cfg.run.seed, step, env.rank)
        t0 = time.perf_counter()
        out = task.train_step(self.engine, step)
        elapsed = time.perf_counter() - t0
        self.state = {**session.advance_state(self.state, step, out.loss, elapsed), **task.state()}
        do_log, do_validate, do_ckpt = session.schedule(cfg.train, step)
        per_step = cfg.train.micro_batch_size * task.grad_accum_steps * env.world_size
        metrics = {"step": step, "loss": out.loss, "lr": self.engine.lr, "grad_norm": self.engine.last_grad_norm or 0.0,
                   "step_time": elapsed, "samples_per_s": per_step / elapsed, **out.metrics}
        if self.info.has_validation and (do_validate or step == cfg.train.max_steps
                                         or (self.info.report_validation and do_ckpt)):
            metrics.update(self.validation_losses())
            self.state = {**self.state, "val_loss": metrics["val_loss"], "val_loss_step": step}
            do_log = True
        if do_log or out.force_log:
            self.logger.step(step, metrics)
        self.progress(metrics)
        if self.info.report_validation and not do_ckpt and ("val_loss" in metrics or task.step_reports):
            ray.train.report(self.report())  # every rank: a report is a collective
        if do_validate and cfg.train.validation_grids:
            self.grid(step)
        if do_ckpt:
            self.checkpoint(step)

    def report(self) -> dict[str, float]:
        return {**session.summary_metrics(self.state), **self.task.report_metrics()}

    def progress(self, metrics: dict) -> None:
        """Rank 0 hands the step's numbers to the driver's progress display, without waiting."""
        if self.env.is_main and self.info.status is not None:
            keys = ("step", "loss", "lr", "samples_per_s", "step_time", "val_loss")
            self.info.status.progress.remote({k: metrics[k] for k in keys if k in metrics})

    def validation_losses(self) -> dict[str, float]:
        """{"val_loss"} of the weights validation uses: the EMA ones when on, with the trained weights'
        as "val_loss_raw"."""
        if self.engine.ema is None:
            return {"val_loss": self.validation_loss()}
        raw = self.validation_loss()
        with self.engine.ema_weights():
            return {"val_loss": self.validation_loss(), "val_loss_raw": raw}

    def validation_loss(self) -> float:
        """Mean loss of every held-out row at fixed noise and timesteps (keyed by sample id and
        session.VALIDATION_STEP), without dropout. Every rank computes all rows (same forwards on every
        rank, as ZeRO-3 needs), so every rank has the same value."""
        module = self.task.module
        was_training = module.training
        module.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in session.validation_batches(self.cfg):
                n = len(batch["sample_id"])
                total += float(self.task.validation_loss(self.engine, batch)) * n
                count += n
        module.train(was_training)
        return total / max(count, 1)

    def grid(self, step: int) -> None:
        """Render and save a validation grid. Under ZeRO-3 every forward all-gathers partitioned weights, so
        every rank renders (same seeds, same images) and only rank 0 writes; otherwise rank 0 renders alone."""
        if not (self.env.is_main or self.engine.collective_forward or self.task.collective_grid):
            return
        module = self.task.module
        was_training = module.training
        module.eval()
        with torch.no_grad(), self.engine.ema_weights():
            grid = self.task.validation_grid(step)
        module.train(was_training)
        if self.env.is_main and grid is not None:
            out = Path(self.info.log_dir) / self.task.grid_path.format(step=step)
            out.parent.mkdir(parents=True, exist_ok=True)
            grid.save(out)
            self.logger.image(self.task.grid_tag, step, grid)

    def checkpoint(self, step: int) -> None:
        """Save and report a checkpoint (all ranks); the final one also carries the exported artifact."""
        report, artifact = self.report(), None
        if step == self.cfg.train.max_steps:
            with self.engine.gathered():
                if self.env.is_main:
                    card = session.card(self.cfg, self.info.model_path, self.state, report)
                    with self.engine.ema_weights():
                        artifact = self.task.export(Path(tempfile.mkdtemp(prefix="diffray-artifact-")), card)
                    if self.engine.ema is not None:
                        self.task.export_raw(artifact)
                    self.logger.artifact(artifact)
        checkpoints.save_checkpoint(self.engine, self.env, self.state, report, self.info.log_dir, artifact)
        if self.info.logs_uri:
            upload_logs(self.info.log_dir, self.info.logs_uri)


def upload_logs(log_dir: str, logs_uri: str) -> None:
    """This node's log files (metrics, worker logs) to the run's `logs/` on object storage; a failed upload is
    logged and training goes on (the logs stay on this node's disk)."""
    try:
        storage.upload_dir(log_dir, logs_uri)
    except (OSError, pa.ArrowException) as exc:
        log.warning("logs not uploaded to %s (kept in %s): %s", logs_uri, log_dir, exc)
