"""Text-to-image LoRA on the Stable Diffusion UNet (optionally the text encoder), on Ray Train.

Skeleton shared by every trainer: setup (components, adapter, engine, restore) -> train (steps,
logging, validation, checkpoints) -> save (artifact into the final checkpoint) -> cleanup.
`train_loop_per_worker(config)` runs on every Ray Train worker; `runner.build_trainer` wraps it.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist

from diffray.config import LoraTrainConfig
from diffray.models.adapters import add_lora, export_lora
from diffray.models.loading import load_components
from diffray.trainers import session
from diffray.trainers.components.diffusion import (
    diffusion_target,
    encode_latents,
    per_sample_loss,
    sample_noise_and_timesteps,
)
from diffray.trainers.engine import build_engine


class LoraDenoiser(torch.nn.Module):
    """The module the engine trains: UNet (+ text encoder when it has LoRA too)."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module | None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, noisy_latents, timesteps, input_ids=None, encoder_hidden_states=None):
        if self.text_encoder is not None:
            encoder_hidden_states = self.text_encoder(input_ids)[0]
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states).sample


def build_model(cfg: LoraTrainConfig, comps) -> LoraDenoiser:
    """Frozen base + LoRA on the configured targets (identical on every rank)."""
    lora = cfg.lora
    add_lora(comps.unet, lora.rank, lora.scale_alpha, lora.dropout, lora.target_modules, cfg.run.seed)
    comps.text_encoder.requires_grad_(False)
    if lora.train_text_encoder:
        add_lora(comps.text_encoder, lora.rank, lora.scale_alpha, lora.dropout, lora.text_encoder_target_modules,
                 cfg.run.seed + 1)
    if cfg.train.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    return LoraDenoiser(comps.unet, comps.text_encoder if lora.train_text_encoder else None)


def compute_loss(engine, comps, batch, step: int, cfg: LoraTrainConfig, env: session.WorkerEnv,
                 prediction_type: str) -> torch.Tensor:
    """Mean denoising loss of one micro-batch; all randomness keyed by (seed, step, sample_id)."""
    ids = [int(i) for i in batch["sample_id"]]
    pixels = batch["pixel_values"].to(env.device, env.dtype)
    with torch.no_grad():
        latents = encode_latents(comps.vae, pixels, ids, step, cfg.run.seed).float()
    noise, timesteps = sample_noise_and_timesteps(tuple(latents.shape[1:]), ids, step, cfg.run.seed,
                                                  comps.noise_scheduler.config.num_train_timesteps,
                                                  cfg.train.noise_offset)
    noise, timesteps = noise.to(env.device), timesteps.to(env.device)
    noisy = comps.noise_scheduler.add_noise(latents, noise, timesteps)
    input_ids = batch["input_ids"].to(env.device)
    if cfg.lora.train_text_encoder:
        pred = engine(noisy, timesteps, input_ids=input_ids)
    else:
        with torch.no_grad():
            hidden = comps.text_encoder(input_ids)[0]
        pred = engine(noisy, timesteps, encoder_hidden_states=hidden)
    target = diffusion_target(comps.noise_scheduler, latents, noise, timesteps, prediction_type)
    return per_sample_loss(pred, target, timesteps, comps.noise_scheduler, prediction_type,
                           cfg.train.snr_gamma).mean()


def render_validation(comps, model: LoraDenoiser, prompts: list[str], steps: int, seed: int, device):
    """Validation images (one per prompt, fixed seeds) from the current weights, as a PIL grid."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from diffray.images import make_grid

    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=model.unet, scheduler=DDIMScheduler.from_config(comps.noise_scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    was_training = model.training
    model.eval()
    images = [pipe(p, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed + i),
                   output_type="pil").images[0] for i, p in enumerate(prompts)]
    model.train(was_training)
    return make_grid([images])


def train_loop_per_worker(config: dict) -> None:
    cfg = LoraTrainConfig.model_validate(config["cfg"])
    model_path, log_dir, status = config["model_path"], config["log_dir"], config.get("status_actor")
    env = session.worker_env(cfg.train.mixed_precision, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker)
    t, gas = cfg.train, cfg.train.grad_accum_steps

    # --- setup
    comps = load_components(model_path)
    model = build_model(cfg, comps).to(env.device)
    comps.vae.requires_grad_(False)
    session.place_frozen(comps.vae, env)
    if not cfg.lora.train_text_encoder:
        session.place_frozen(comps.text_encoder, env)
    engine = build_engine(model, cfg.strategy, cfg.optim, t.micro_batch_size, gas, t.max_steps, env.precision,
                          env.device)
    state = session.restore(engine) or {"step": 0, "first_losses": [], "recent_losses": []}
    start = state["step"]
    prediction_type = cfg.model.prediction_type or comps.noise_scheduler.config.prediction_type
    batches = session.batch_stream(ray.train.get_dataset_shard("train"), t.micro_batch_size, skip=start * gas)
    logger = session.MetricsLogger(log_dir, env.is_main, t.max_steps, start, config.get("progress_bar", False))
    logger.event(event="start", resumed_from_step=start, world_size=env.world_size, precision=env.precision,
                 strategy=cfg.strategy.name, zero_stage=cfg.strategy.zero_stage)

    # --- train
    for step in range(start + 1, t.max_steps + 1):
        t0 = time.perf_counter()
        session.maybe_kill_rank(cfg.faults, env, step, log_dir)
        session.seed_step(cfg.run.seed, step, env.rank)
        step_loss = 0.0
        for _ in range(gas):
            loss = compute_loss(engine, comps, next(batches), step, cfg, env, prediction_type)
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
            engine.step()
            step_loss += mean_loss / gas
        elapsed = time.perf_counter() - t0
        state = session.advance_state(state, step, step_loss, elapsed)
        do_log, do_validate, do_ckpt = session.schedule(t, step)
        metrics = {"step": step, "loss": step_loss, "lr": engine.lr, "grad_norm": engine.last_grad_norm or 0.0,
                   "step_time": elapsed, "samples_per_s": t.micro_batch_size * gas * env.world_size / elapsed}
        if do_log:
            logger.step(step, metrics)
        # Under ZeRO-3 every forward all-gathers partitioned weights, so every rank renders (same seeds,
        # same images) and only rank 0 writes; otherwise rank 0 renders alone.
        if do_validate and (env.is_main or engine.collective_forward):
            grid = render_validation(comps, model, t.validation_prompts, t.validation_inference_steps,
                                     cfg.run.seed, env.device)
            if env.is_main:
                out = Path(log_dir) / "validation" / f"step_{step:06d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                grid.save(out)
                logger.image("validation", step, grid)
        if do_ckpt:
            artifact = None
            if step == t.max_steps:  # --- save: the final checkpoint also carries the exported adapter
                with engine.gathered():
                    if env.is_main:
                        artifact = export_lora(Path(tempfile.mkdtemp(prefix="diffray-artifact-")), model.unet,
                                               model.text_encoder, session.card(cfg, model_path, state))
            session.save_checkpoint(engine, env, state, session.summary_metrics(state), cfg.faults, log_dir,
                                    artifact)

    # --- cleanup
    logger.event(event="end", step=state["step"])
    logger.close()
    if dist.is_initialized():
        dist.barrier()
