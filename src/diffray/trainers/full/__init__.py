"""Full fine-tuning (`method: full`): diffusers' train_text_to_image done the diffray way. Every UNet
weight trains (and the text encoder's with `full.train_text_encoder`), from the base model's weights or
re-initialised from the parts' configs (`full.from_scratch`); the artifact is a pipeline dir that
`StableDiffusionPipeline.from_pretrained` loads.

This file declares the method (its config and `METHOD`); the worker side is `task.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffray.config import RunSection, Section, TrainConfig
from diffray.trainers.method import Method


class FullSection(Section):
    train_text_encoder: bool = Field(False, description="Also fine-tune every text-encoder weight (the latent "
                                     "cache then serves token ids; the encoder runs in the engine).")
    from_scratch: bool = Field(False, description="Re-initialise the trained parts from their configs (seeded by "
                               "run.seed, identical on every rank) instead of starting from the base weights.")


class FullTrainConfig(TrainConfig):
    method: Literal["full"] = Field("full", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="full-sample"))
    full: FullSection = Field(default_factory=FullSection)


def _task() -> type:
    from diffray.trainers.full.task import FullTask

    return FullTask


METHOD = Method(name="full", config=FullTrainConfig, task=_task)
