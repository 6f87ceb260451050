"""Autoencoder training (`method: vae`): the AutoencoderKL of a model dir (or a fresh one from its config,
`vae.from_scratch`) learns to reconstruct the training images: L1 + MSE on pixels decoded from a
posterior sample, plus `vae.kl_weight` x the KL to N(0, I) per latent element. The artifact is an
`AutoencoderKL.save_pretrained` dir whose `scaling_factor` makes latents unit-variance.

This file declares the method (its config and `METHOD`); the worker side is `task.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffray.config import RunSection, Section, TrainConfig, TrainSection
from diffray.trainers.method import Method


class VaeSection(Section):
    kl_weight: float = Field(1e-4, ge=0, description="Weight of the KL term (per latent element).")
    from_scratch: bool = Field(False, description="Re-initialise the VAE from its config (seeded by run.seed).")
    scaling_samples: int = Field(64, ge=1, le=100_000, description="Training rows (kept on rank 0) whose "
                                 "posterior means measure the exported scaling_factor (1 / their std).")
    grid_images: int = Field(4, ge=1, le=16, description="Images in the validation grid (originals over "
                             "reconstructions).")


class VaeTrainConfig(TrainConfig):
    method: Literal["vae"] = Field("vae", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="vae-sample"))
    train: TrainSection = Field(default_factory=lambda: TrainSection(validation_prompts=[]))
    vae: VaeSection = Field(default_factory=VaeSection)

    @model_validator(mode="after")
    def _check(self) -> VaeTrainConfig:
        if self.data.cache != "off":
            raise ValueError("data.cache: method vae trains the VAE, so its latents cannot be cached; set data.cache off")
        return self


def _task() -> type:
    from diffray.trainers.vae.task import VaeTask

    return VaeTask


METHOD = Method(name="vae", config=VaeTrainConfig, task=_task)
