"""A learned reward (issue 19 part 4): a small Bradley-Terry preference model (`diffray.models.reward`)
trained on the same preference pairs as Diffusion-DPO, reading the base model's frozen VAE latents and
text-encoder states. Its artifact is what DDPO's `learned` reward scores with
(`ddpo.reward: {name: learned, options: {path: DIR}}`).

This file declares the method (config, `METHOD`); the worker side is `task.py`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffray.config import OptimSection, RunSection, Section, TrainConfig, TrainSection
from diffray.trainers.method import Method
from diffray.trainers.pairs import PairDataSection


class RewardModelSection(Section):
    channels: int = Field(64, ge=4, le=1024, description="Channels of every conv layer.")
    layers: int = Field(3, ge=1, le=8, description="3x3 conv layers, each modulated by the prompt (FiLM).")


class RewardModelTrainConfig(TrainConfig):
    method: Literal["reward_model"] = Field("reward_model", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="reward-model"))
    data: PairDataSection = Field(default_factory=PairDataSection, description="The preference pairs.")
    optim: OptimSection = Field(default_factory=lambda: OptimSection(lr=1e-3))
    train: TrainSection = Field(default_factory=lambda: TrainSection(validation_prompts=[], validation_grids=False))
    reward_model: RewardModelSection = Field(default_factory=RewardModelSection)


def _task() -> type:
    from diffray.trainers.reward_model.task import RewardModelTask

    return RewardModelTask


METHOD = Method(name="reward_model", config=RewardModelTrainConfig, task=_task)
