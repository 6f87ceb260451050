"""Textual Inversion on Ray Train: learn the input embedding(s) of a new placeholder token from a few
images of a concept; the UNet, VAE and every other embedding row stay frozen and bit-identical.

`TextualInversionTask` plugs the method into the shared loop (`diffray.trainers.loop`). The engine
trains the text encoder's input embedding matrix; a `RowGuard` masks the gradient of the old rows and
writes them back after every optimizer step and after a resume (as the reference implementations do),
which works unchanged under DDP and DeepSpeed ZeRO 0-2. `preflight` runs on the driver before Ray starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffray.config import TextualInversionTrainConfig
from diffray.data.transforms import tokenize_captions
from diffray.models.loading import load_components
from diffray.models.textual_inversion import (
    TI_WEIGHTS,
    RowGuard,
    add_placeholder_tokens,
    check_tokens,
    export_textual_inversion,
    placeholder_text,
    placeholder_tokens,
)
from diffray.trainers import session
from diffray.trainers.components.diffusion import diffusion_target, noise_latents, per_sample_loss
from diffray.trainers.components.prompts import template_prompts
from diffray.trainers.loop import run_worker
from diffray.trainers.lora import render_validation


class TextualInversionDenoiser(torch.nn.Module):
    """The module the engine trains: token ids -> text encoder -> UNet noise prediction. Only the text
    encoder's input embedding matrix requires grad."""

    def __init__(self, text_encoder: torch.nn.Module, unet: torch.nn.Module):
        super().__init__()
        self.text_encoder = text_encoder
        self.unet = unet

    def forward(self, noisy_latents, timesteps, input_ids):
        hidden = self.text_encoder(input_ids)[0]
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=hidden).sample


def build_model(cfg: TextualInversionTrainConfig, comps) -> tuple[TextualInversionDenoiser, list[int]]:
    """Add the placeholder token(s) (rows initialised from the initializer token) and freeze everything
    but the input embeddings. Returns the module and the new token ids (identical on every rank)."""
    ti = cfg.textual_inversion
    token_ids = add_placeholder_tokens(comps.tokenizer, comps.text_encoder, ti.placeholder_token,
                                       ti.initializer_token, ti.num_vectors)
    comps.unet.requires_grad_(False)
    comps.text_encoder.requires_grad_(False)
    comps.text_encoder.get_input_embeddings().weight.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    return TextualInversionDenoiser(comps.text_encoder, comps.unet), token_ids


def compute_loss(engine, comps, batch, step: int, cfg: TextualInversionTrainConfig, env: session.WorkerEnv,
                 prediction_type: str) -> torch.Tensor:
    """Mean denoising loss of one micro-batch captioned by templates; randomness keyed by (seed, step, sample_id)."""
    ti = cfg.textual_inversion
    ids = [int(i) for i in batch["sample_id"]]
    prompts = template_prompts(ti.learnable_property, placeholder_text(ti.placeholder_token, ti.num_vectors), ids,
                               step, cfg.run.seed)
    input_ids = torch.from_numpy(tokenize_captions(comps.tokenizer, prompts)).to(env.device)
    n = noise_latents(comps.vae, comps.noise_scheduler, batch, env.device, env.dtype, step, cfg.run.seed,
                      cfg.train.noise_offset)
    pred = engine(n.noisy, n.timesteps, input_ids)
    target = diffusion_target(comps.noise_scheduler, n.latents, n.noise, n.timesteps, prediction_type)
    return per_sample_loss(pred, target, n.timesteps, comps.noise_scheduler, prediction_type,
                           cfg.train.snr_gamma).mean()


def card_fields(cfg: TextualInversionTrainConfig) -> dict:
    """What a user needs to load and prompt the artifact."""
    ti = cfg.textual_inversion
    return {"placeholder_token": ti.placeholder_token, "num_vectors": ti.num_vectors,
            "tokens": placeholder_tokens(ti.placeholder_token, ti.num_vectors), "weight_name": TI_WEIGHTS,
            "usage": f"pipe.load_textual_inversion(dir, weight_name={TI_WEIGHTS!r}); write "
                     f"{ti.placeholder_token!r} in prompts (diffusers expands multi-vector tokens itself)"}


def preflight(cfg: TextualInversionTrainConfig, model_path: str) -> None:
    """Driver-side checks before any Ray work: the tokens against the model's tokenizer, and every image
    of `data.path` decodes (concept sets are a handful of images, so reading them here is cheap).

    Raises:
        ConfigError: the placeholder is already a token, or the initializer is not exactly one token.
        DatasetError: no images, or a bad one (named).
    """
    from diffray.data import resolve_data_path
    from diffray.data.imagefolder import check_concept_images
    from diffray.data.pipeline import load_tokenizer

    ti = cfg.textual_inversion
    check_tokens(load_tokenizer(model_path), ti.placeholder_token, ti.initializer_token, ti.num_vectors)
    check_concept_images(resolve_data_path(cfg.data.path), cfg.data.caption_column, cfg.data.image_column,
                         ti.placeholder_token, cfg.train.micro_batch_size, "data.path: concept images")


def dataset_sources(cfg: TextualInversionTrainConfig, model_path: str) -> dict:
    """{"train": the concept images} (a plain image folder is fine: captions come from the templates)."""
    from diffray.data import resolve_data_path
    from diffray.trainers.runner import DataSource

    return {"train": DataSource(resolve_data_path(cfg.data.path), cfg.textual_inversion.placeholder_token)}


class TextualInversionTask:
    """Textual Inversion in the shared loop (see `diffray.trainers.loop.Task`)."""

    def __init__(self, cfg: TextualInversionTrainConfig, model_path: str, env: session.WorkerEnv):
        self.cfg, self.env = cfg, env
        self.comps = load_components(model_path)
        self.module, self.token_ids = build_model(cfg, self.comps)
        self.module.to(env.device)
        self.comps.vae.requires_grad_(False)
        session.place_frozen(self.comps.vae, env)
        # Saved before the engine restores a checkpoint: a resumed optimizer's master copy may carry
        # weight-decayed old rows into the weight, which `start` undoes.
        self.guard = RowGuard(self.comps.text_encoder.get_input_embeddings().weight, self.token_ids).register()
        self.prediction_type = cfg.model.prediction_type or self.comps.noise_scheduler.config.prediction_type
        self.counters = session.EncoderCalls(self.comps)
        self.batches = None

    def start(self, engine, skip_micro_batches: int) -> None:
        self.guard.restore()
        self.batches = session.data_stream("train", self.cfg, self.env, skip_micro_batches)

    def loss(self, engine, step: int) -> torch.Tensor:
        return compute_loss(engine, self.comps, next(self.batches), step, self.cfg, self.env, self.prediction_type)

    def after_optimizer_step(self) -> None:
        self.guard.restore()

    def validation_loss(self, engine, batch: dict) -> torch.Tensor:
        return compute_loss(engine, self.comps, batch, session.VALIDATION_STEP, self.cfg, self.env,
                            self.prediction_type)

    def validation_grid(self, step: int):
        return render_validation(self.comps, self.module, self.cfg.train.validation_prompts,
                                 self.cfg.train.validation_inference_steps, self.cfg.run.seed, self.env.device)

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        return export_textual_inversion(out_dir, self.comps.text_encoder, self.token_ids,
                                        self.cfg.textual_inversion.placeholder_token, {**card, **card_fields(self.cfg)})


def train_loop_per_worker(config: dict) -> None:
    run_worker(config, TextualInversionTrainConfig, TextualInversionTask)
