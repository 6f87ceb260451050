"""The model-family seam: what differs between Stable Diffusion 1.x/2.x, SDXL, Flux, ... when training a
denoiser. A family knows how to load its parts, tokenize and encode prompts, noise latents and compute
the training target, and how to assemble an inference pipeline from (possibly trained) parts.

`StableDiffusion` (SD 1.x/2.x: CLIP text encoder, UNet2DConditionModel, AutoencoderKL, DDPM training
schedule) is the one family today; `family_of(model_path)` picks it. A new family is a class with the
same methods, added to `FAMILIES`. Never imports Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffray.errors import ModelError
from diffray.models.loading import SDComponents, load_components
from diffray.trainers.components.diffusion import NoisedLatents, diffusion_target, noise_latents


class StableDiffusion:
    """SD 1.x / 2.x (epsilon or v-prediction)."""

    name = "stable-diffusion"
    pipeline_classes = ("StableDiffusionPipeline",)

    def load(self, model_path: str, dtype: torch.dtype = torch.float32, device="cpu") -> SDComponents:
        return load_components(model_path, dtype=dtype, device=device)

    def tokenize(self, comps, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, 77] (padded to the tokenizer's length, truncated)."""
        return comps.tokenizer(prompts, padding="max_length", truncation=True,
                               max_length=comps.tokenizer.model_max_length, return_tensors="pt").input_ids

    def encode(self, text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
        """Text-encoder states [B, 77, D] that condition the denoiser (with grad when the encoder trains)."""
        return text_encoder(input_ids)[0]

    @torch.no_grad()
    def prompt_states(self, comps, prompts: list[str], device) -> torch.Tensor:
        """Frozen text-encoder states [B, 77, D] of `prompts`."""
        return self.encode(comps.text_encoder, self.tokenize(comps, prompts).to(device))

    def prediction_type(self, comps, configured: str | None) -> str:
        return configured or comps.noise_scheduler.config.prediction_type

    def noised(self, comps, batch: dict, device, dtype, step: int, seed: int, noise_offset: float,
               timestep_range: tuple[int, int] | None = None) -> NoisedLatents:
        """Latents of a batch (pixels through the VAE, or the latent cache) and their noised version, every
        draw keyed by (seed, step, sample_id); timesteps from `timestep_range` ([lo, hi)) when given."""
        return noise_latents(comps.vae, comps.noise_scheduler, batch, device, dtype, step, seed, noise_offset,
                             timestep_range)

    def target(self, comps, n: NoisedLatents, prediction_type: str) -> torch.Tensor:
        return diffusion_target(comps.noise_scheduler, n.latents, n.noise, n.timesteps, prediction_type)

    def pipeline(self, comps, unet=None, text_encoder=None, scheduler=None):
        """A `StableDiffusionPipeline` over the given (live, possibly trained) parts; the loaded ones
        where None. Nothing is copied, so rendering sees the current weights."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=text_encoder or comps.text_encoder,
                                       tokenizer=comps.tokenizer, unet=unet or comps.unet,
                                       scheduler=scheduler or comps.noise_scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


FAMILIES = (StableDiffusion(),)


def family_of(model_path: str):
    """The family of a diffusers model dir (by `model_index.json`'s pipeline class); a hub id or a dir
    without the index is taken as Stable Diffusion.

    Raises:
        ModelError: the dir holds a pipeline of a family diffray does not train.
    """
    index = Path(model_path) / "model_index.json"
    if not index.is_file():
        return FAMILIES[0]
    pipeline_class = json.loads(index.read_text()).get("_class_name", "")
    for family in FAMILIES:
        if pipeline_class in family.pipeline_classes:
            return family
    known = ", ".join(c for f in FAMILIES for c in f.pipeline_classes)
    raise ModelError(f"{model_path}: a {pipeline_class} model; diffray trains {known}")
