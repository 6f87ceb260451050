"""The per-worker training loop every method shares: setup -> train -> save -> cleanup.

A method supplies a `Task` (what to train, its loss, its validation images, its artifact); this module
owns everything else: the engine, resume, gradient accumulation, NaN/inf stop, fault injection,
logging, validation scheduling, checkpoints and the artifact in the final checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import ray
import torch
import torch.distributed as dist

from diffray.trainers import session
from diffray.trainers.engine import build_engine


class Task(Protocol):
    """What a training method plugs into the shared loop (built on every worker)."""

    module: torch.nn.Module  # what the engine wraps; its requires_grad params are trained

    def start(self, engine, skip_micro_batches: int) -> None:
        """Open the dataset streams, skipping what earlier (resumed) steps consumed."""

    def loss(self, engine, step: int) -> torch.Tensor:
        """The loss of the next micro-batch (a scalar; backward is the loop's job)."""

    def after_optimizer_step(self) -> None:
        """Hook after each optimizer step (e.g. restore frozen rows)."""

    # Optional: `counters` with `take() -> dict[str, int]` (e.g. session.EncoderCalls): per-step counts
    # added to the step's metrics.

    def validation_loss(self, engine, batch: dict) -> torch.Tensor:
        """Mean loss of a held-out micro-batch at fixed noise/timesteps (step key session.VALIDATION_STEP),
        no dropout (called under no_grad, module in eval mode)."""

    def validation_grid(self, step: int):
        """A PIL grid of validation images from the current weights (called on every rank under ZeRO-3)."""

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        """Write the method's artifact into out_dir (rank 0, trainable weights gathered)."""


def run_worker(config: dict, cfg_cls, make_task: Callable[[Any, str, session.WorkerEnv], Task]) -> None:
    """The body of every method's `train_loop_per_worker(config)`."""
    cfg = cfg_cls.model_validate(config["cfg"])
    model_path, log_dir, status = config["model_path"], config["log_dir"], config.get("status_actor")
    has_validation = config.get("has_validation", False)
    # Under Tune every validation step is reported (a scheduler decides on it), each report carrying val_loss.
    report_validation = config.get("report_validation", False)
    env = session.worker_env(cfg.train.mixed_precision, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker)
    t, gas = cfg.train, cfg.train.grad_accum_steps

    # --- setup
    task = make_task(cfg, model_path, env)
    engine = build_engine(task.module, cfg.strategy, cfg.optim, t.micro_batch_size, gas, t.max_steps,
                          env.precision, env.device)
    state = session.restore(engine) or {"step": 0, "first_losses": [], "recent_losses": []}
    start = state["step"]
    task.start(engine, start * gas)
    logger = session.MetricsLogger(log_dir, env.is_main, t.max_steps, start, config.get("progress_bar", False))
    logger.event(event="start", method=cfg.method, resumed_from_step=start, world_size=env.world_size,
                 precision=env.precision, strategy=cfg.strategy.name, zero_stage=cfg.strategy.zero_stage)

    # --- train
    for step in range(start + 1, t.max_steps + 1):
        t0 = time.perf_counter()
        session.maybe_kill_rank(cfg.faults, env, step, log_dir)
        session.seed_step(cfg.run.seed, step, env.rank)
        counters = getattr(task, "counters", None)
        if counters is not None:
            counters.take()  # drop calls made outside training steps (validation, set-up)
        step_loss = 0.0
        for _ in range(gas):
            loss = task.loss(engine, step)
            if cfg.faults.nan_loss_at_step == step:
                loss = loss * float("nan")
            mean_loss = session.global_mean(loss.detach())
            if not torch.isfinite(torch.tensor(mean_loss)):
                logger.event(event="nonfinite_loss", step=step, loss=mean_loss)
                if env.is_main and status is not None:
                    ray.get(status.set.remote("nonfinite_loss_step", step))
                logger.close()
                return
            engine.backward(loss)
            if engine.step():
                task.after_optimizer_step()
            step_loss += mean_loss / gas
        elapsed = time.perf_counter() - t0
        state = session.advance_state(state, step, step_loss, elapsed)
        do_log, do_validate, do_ckpt = session.schedule(t, step)
        metrics = {"step": step, "loss": step_loss, "lr": engine.lr, "grad_norm": engine.last_grad_norm or 0.0,
                   "step_time": elapsed, "samples_per_s": t.micro_batch_size * gas * env.world_size / elapsed,
                   **(counters.take() if counters is not None else {})}
        val_due = do_validate or step == t.max_steps or (report_validation and do_ckpt)
        if has_validation and val_due:
            metrics["val_loss"] = validation_loss(task, engine, cfg)
            state = {**state, "val_loss": metrics["val_loss"], "val_loss_step": step}
            do_log = True
        if do_log:
            logger.step(step, metrics)
        if report_validation and has_validation and val_due and not do_ckpt:
            ray.train.report(session.summary_metrics(state))  # every rank: a report is a collective
        # Under ZeRO-3 every forward all-gathers partitioned weights, so every rank renders (same seeds,
        # same images) and only rank 0 writes; otherwise rank 0 renders alone.
        if do_validate and t.validation_grids and (env.is_main or engine.collective_forward):
            was_training = task.module.training
            task.module.eval()
            with torch.no_grad():
                grid = task.validation_grid(step)
            task.module.train(was_training)
            if env.is_main:
                out = Path(log_dir) / "validation" / f"step_{step:06d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                grid.save(out)
                logger.image("validation", step, grid)
        if do_ckpt:
            artifact = None
            if step == t.max_steps:  # --- save: the final checkpoint also carries the exported artifact
                with engine.gathered():
                    if env.is_main:
                        artifact = task.export(Path(tempfile.mkdtemp(prefix="diffray-artifact-")),
                                               session.card(cfg, model_path, state))
            session.save_checkpoint(engine, env, state, session.summary_metrics(state), cfg.faults, log_dir,
                                    artifact)

    # --- cleanup
    logger.event(event="end", step=state["step"])
    logger.close()
    if dist.is_initialized():
        dist.barrier()


def validation_loss(task: Task, engine, cfg) -> float:
    """Mean loss of every held-out row at fixed noise and timesteps (keyed by sample id and
    session.VALIDATION_STEP), without dropout. Every rank computes all rows (same forwards on every
    rank, as ZeRO-3 needs), so every rank has the same value."""
    was_training = task.module.training
    task.module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in session.validation_batches(cfg):
            n = len(batch["sample_id"])
            total += float(task.validation_loss(engine, batch)) * n
            count += n
    task.module.train(was_training)
    return total / max(count, 1)


def render_prompts(comps, unet: torch.nn.Module, text_encoder: torch.nn.Module, prompts: list[str], steps: int,
                   seed: int):
    """Images (one per prompt, seeds seed+i) from the given UNet/text encoder with a DDIM sampler, as a grid row."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=text_encoder, tokenizer=comps.tokenizer,
                                   unet=unet, scheduler=DDIMScheduler.from_config(comps.noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return [pipe(p, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed + i),
                 output_type="pil").images[0] for i, p in enumerate(prompts)]
