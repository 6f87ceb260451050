"""Text-to-image LoRA on the Stable Diffusion UNet (optionally the text encoder), on Ray Train.

`LoraTask` plugs the method into the shared loop (`diffray.trainers.loop`: setup -> train -> save ->
cleanup); `train_loop_per_worker(config)` runs on every Ray Train worker; `runner.build_trainer` wraps it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffray.config import LoraTrainConfig
from diffray.models.adapters import add_lora, export_lora
from diffray.models.loading import load_components
from diffray.trainers import session
from diffray.trainers.components.diffusion import (
    caption_dropout_mask,
    diffusion_target,
    noise_latents,
    per_sample_loss,
)
from diffray.trainers.loop import render_prompts, run_worker


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
    return denoising_losses(engine, comps, batch, step, cfg, env, prediction_type,
                            cfg.lora.train_text_encoder).mean()


def empty_prompt(comps, device) -> dict[str, torch.Tensor]:
    """Token ids [77] and frozen text-encoder states [77, D] of the empty caption (caption dropout)."""
    ids = comps.tokenizer([""], padding="max_length", truncation=True, max_length=comps.tokenizer.model_max_length,
                          return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        return {"input_ids": ids[0], "hidden": comps.text_encoder(ids)[0][0]}


def denoising_losses(engine, comps, batch, step: int, cfg, env: session.WorkerEnv, prediction_type: str,
                     text_encoder_in_engine: bool, empty: dict[str, torch.Tensor] | None = None,
                     forward_kwargs: dict | None = None, caption_dropout: float | None = None) -> torch.Tensor:
    """Per-sample denoising losses [B] of a micro-batch {sample_id, pixel_values | latent_mean+latent_std,
    input_ids[, prompt_embeds]}.

    Noise, timestep, VAE sample and caption dropout of each row are keyed by (cfg.run.seed, step,
    sample_id), so a row's loss does not depend on which batch or rank it lands in. Rows from the
    latent cache need no VAE or (frozen) text-encoder work. `text_encoder_in_engine`: the engine's
    module runs the text encoder itself (it trains); otherwise prompts are encoded here without grad.
    `empty`: the empty caption (see `empty_prompt`), computed here when dropout needs it and it is None.
    `forward_kwargs`: extra inputs of the engine's module (e.g. the ControlNet's control images).
    `caption_dropout`: overrides `data.caption_dropout` (0 for validation losses).
    """
    ids = [int(i) for i in batch["sample_id"]]
    n = noise_latents(comps.vae, comps.noise_scheduler, batch, env.device, env.dtype, step, cfg.run.seed,
                      cfg.train.noise_offset)
    p = cfg.data.caption_dropout if caption_dropout is None else caption_dropout
    drop = caption_dropout_mask(ids, step, cfg.run.seed, p).to(env.device)
    if drop.any() and empty is None:
        empty = empty_prompt(comps, env.device)
    input_ids = batch["input_ids"].to(env.device)
    if drop.any():
        input_ids = torch.where(drop[:, None], empty["input_ids"][None], input_ids)
    if text_encoder_in_engine:
        pred = engine(n.noisy, n.timesteps, input_ids=input_ids, **(forward_kwargs or {}))
    else:
        if "prompt_embeds" in batch:
            hidden = batch["prompt_embeds"].to(env.device, env.dtype)
            if drop.any():
                hidden = torch.where(drop[:, None, None], empty["hidden"][None].to(hidden.dtype), hidden)
        else:
            with torch.no_grad():
                hidden = comps.text_encoder(input_ids)[0]
        pred = engine(n.noisy, n.timesteps, encoder_hidden_states=hidden, **(forward_kwargs or {}))
    target = diffusion_target(comps.noise_scheduler, n.latents, n.noise, n.timesteps, prediction_type)
    return per_sample_loss(pred, target, n.timesteps, comps.noise_scheduler, prediction_type, cfg.train.snr_gamma)


class LoraTask:
    """LoRA text-to-image: the shared loop's plug-in (see `diffray.trainers.loop.Task`)."""

    def __init__(self, cfg: LoraTrainConfig, model_path: str, env: session.WorkerEnv):
        self.cfg, self.env = cfg, env
        self.comps = load_components(model_path)
        self.module = self.build_model(cfg, self.comps).to(env.device)
        self.comps.vae.requires_grad_(False)
        session.place_frozen(self.comps.vae, env)
        if not self.trains_text_encoder:
            session.place_frozen(self.comps.text_encoder, env)
        self.prediction_type = cfg.model.prediction_type or self.comps.noise_scheduler.config.prediction_type
        self.empty = empty_prompt(self.comps, env.device) if cfg.data.caption_dropout > 0 else None
        self.counters = session.EncoderCalls(self.comps)
        self.batches = None

    @staticmethod
    def build_model(cfg, comps) -> LoraDenoiser:
        return build_model(cfg, comps)

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.lora.train_text_encoder

    def start(self, engine, skip_micro_batches: int) -> None:
        self.batches = session.data_stream("train", self.cfg, self.env, skip_micro_batches)

    def loss(self, engine, step: int) -> torch.Tensor:
        return denoising_losses(engine, self.comps, next(self.batches), step, self.cfg, self.env,
                                self.prediction_type, self.trains_text_encoder, self.empty).mean()

    def after_optimizer_step(self) -> None:
        pass

    def validation_loss(self, engine, batch: dict) -> torch.Tensor:
        return denoising_losses(engine, self.comps, batch, session.VALIDATION_STEP, self.cfg, self.env,
                                self.prediction_type, self.trains_text_encoder, self.empty, caption_dropout=0.0).mean()

    def validation_grid(self, step: int):
        return render_validation(self.comps, self.module, self.cfg.train.validation_prompts,
                                 self.cfg.train.validation_inference_steps, self.cfg.run.seed, self.env.device)

    def export(self, out_dir: Path, card: dict) -> Path:
        return export_lora(out_dir, self.module.unet, self.module.text_encoder, card)


def render_validation(comps, model: LoraDenoiser, prompts: list[str], steps: int, seed: int, device):
    """Validation images (one per prompt, fixed seeds) from the current weights, as a PIL grid."""
    from diffray.images import make_grid

    return make_grid([render_prompts(comps, model.unet, comps.text_encoder, prompts, steps, seed)])


def train_loop_per_worker(config: dict) -> None:
    run_worker(config, LoraTrainConfig, LoraTask)
