"""DDPO reward alignment (Black et al., 2023): LoRA on the UNet trained with PPO's clipped objective over
stochastic DDIM trajectories, scored by a reward instead of fitted to a dataset. `train.max_steps`
counts DDPO epochs; the artifact is a standard LoRA dir whose card carries the reward's first and last
epoch means.

This file declares the method (config, driver checks, `METHOD`); the reward actor pool is `pool.py` and
the worker side (one loop step = one epoch: sample, score, PPO passes) is `task.py`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from diffray.config import DataSection, LoraSection, RunSection, Section, TrainConfig, TrainSection
from diffray.errors import ConfigError
from diffray.trainers.method import DataSource, Method


class RewardSection(Section):
    name: str = Field("jpeg_compressibility", description="Reward in the registry (diffray.trainers.components."
                      "rewards): jpeg_compressibility | jpeg_incompressibility | aesthetic | prompt_alignment | "
                      "world_alignment | "
                      "learned (options.path: a reward_model artifact).")
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword options of the reward's factory "
                                    "(e.g. clip_path, head_path: local paths; nothing is downloaded).")
    actors: int = Field(1, ge=0, le=64, description="Reward actors in the pool shared by all workers, called "
                        "asynchronously (the next batch samples while the last is scored); 0 scores inline on "
                        "each training worker.")
    num_cpus: float = Field(0.25, ge=0, description="CPUs each reward actor reserves.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each reward actor reserves (a model-based reward on GPU).")
    max_restarts: int = Field(3, ge=-1, description="Ray restarts of a dead reward actor (-1 = forever).")
    retries: int = Field(3, ge=0, description="Times a scoring call is resubmitted after its actor died "
                         "(RayActorError); the restarted actor scores it.")
    start_timeout_s: float = Field(300.0, gt=0, description="Fail when the reward actors have not started by then "
                                   "(the cluster cannot place them).")


class DDPOSection(Section):
    prompts: list[str] = Field(["a red circle on a blue background", "a green square on a white background",
                                "a yellow triangle", "a photo of a cat"], min_length=1,
                               description="Prompts drawn (uniformly, seeded) for each sample.")
    prompts_file: str | None = Field(None, description="A text file of prompts, one per line (blank lines "
                                     "skipped); replaces `prompts` when set.")
    negative_prompt: str = Field("", description="Prompt of the unconditional branch of classifier-free guidance.")
    reward: RewardSection = Field(default_factory=RewardSection)
    resolution: int | None = Field(None, ge=8, le=4096, description="Image size in pixels (multiple of 8); None: "
                                   "the UNet's sample_size x 8.")
    sample_steps: int = Field(10, ge=2, le=1000, description="DDIM steps per trajectory (T).")
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = Field(
        None, description="The sampler's timestep spacing (None: the model scheduler's). With few steps, "
        "'leading' (SD's) starts below full noise and leaves each step's sigma_t tiny (0.04 and 0.02 at 2 "
        "steps): the policy cannot explore; 'trailing' starts from full noise (sigma_t 0.85 at the first step).")
    eta: float = Field(1.0, gt=0, le=1.0, description="DDIM noise weight (> 0: each step is a Gaussian policy).")
    guidance: float = Field(5.0, ge=0, description="Classifier-free guidance scale while sampling and training.")
    samples_per_epoch: int = Field(16, ge=1, description="Trajectories each worker samples per epoch.")
    sample_batch_size: int = Field(4, ge=1, description="Trajectories per sampling batch (one reward call each).")
    images_per_prompt: int = Field(1, ge=1, description="Trajectories of each drawn prompt in a sampling batch "
                                   "(a group, other noise each). Above 1, a prompt's rewards are normalised "
                                   "within its group from its first epoch (`stat_min_count` counts at most the "
                                   "group): what a reward with per-prompt offsets, such as a learned "
                                   "Bradley-Terry model, needs when there are more prompts than epochs can revisit.")
    inner_epochs: int = Field(1, ge=1, le=100, description="PPO passes over each epoch's samples.")
    timestep_fraction: float = Field(1.0, gt=0, le=1.0, description="Fraction of the T steps trained per sample "
                                     "(a random subset, per sample and pass).")
    min_step_std: float = Field(0.0, ge=0, lt=1, description="Steps whose sigma_t is below this are sampled but "
                                "not trained: their log-probability gradient scales as 1 / sigma_t and is mostly "
                                "that step's own noise (the last step's sigma_t is about 0.03 at any T). 0 (DDPO "
                                "as published): every step; timestep_fraction then counts the steps kept.")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip epsilon.")
    adv_clip_max: float = Field(5.0, gt=0, description="Advantages are clamped to [-adv_clip_max, adv_clip_max].")
    kl_coef: float = Field(0.0, ge=0, description="Weight of each trained step's KL to the base model (the LoRA "
                           "switched off) added to the PPO loss, as DPOK (Fan et al., 2023): holds the policy near "
                           "the base against a reward it can exploit. 0 (DDPO as published): off, no extra forward.")
    per_prompt_advantages: bool = Field(True, description="Normalise rewards per prompt with a running stat tracker "
                                        "(else over the epoch's batch of all workers).")
    stat_buffer_size: int | None = Field(32, ge=1, description="Rewards kept per prompt by the stat tracker "
                                         "(None: all).")
    stat_min_count: int = Field(16, ge=1, description="Below this many rewards for a prompt, normalise over the "
                                "epoch's batch instead.")
    grid_images: int = Field(4, ge=1, le=32, description="Best and worst samples shown in each epoch's image grid "
                             "(every train.validate_every epochs and the last).")


class DDPOTrainConfig(TrainConfig):
    """DDPO reward alignment: train.max_steps counts epochs (sample, score, inner_epochs of PPO updates);
    train.micro_batch_size is the trajectories per PPO forward."""

    method: Literal["ddpo"] = Field("ddpo", description="Training method.")
    run: RunSection = Field(default_factory=lambda: RunSection(name="ddpo-sample"))
    data: DataSection | None = Field(None, description="Unused: DDPO samples its own images from ddpo.prompts.")
    train: TrainSection = Field(default_factory=lambda: TrainSection(max_steps=10, checkpoint_every=5,
                                                                     validate_every=5, validation_prompts=[]))
    lora: LoraSection = Field(default_factory=LoraSection)
    ddpo: DDPOSection = Field(default_factory=DDPOSection)

    @model_validator(mode="after")
    def _check(self) -> DDPOTrainConfig:
        d, t = self.ddpo, self.train
        if self.data is not None:
            raise ValueError("data: DDPO trains on samples of ddpo.prompts, not a dataset; remove the data section")
        if self.lora.train_text_encoder:
            raise ValueError("lora.train_text_encoder: DDPO trains LoRA on the UNet only")
        if d.resolution is not None and d.resolution % 8:
            raise ValueError(f"ddpo.resolution must be a multiple of 8 (the VAE downsamples by 8), "
                             f"got {d.resolution}")
        if d.samples_per_epoch % d.sample_batch_size:
            raise ValueError(f"ddpo.samples_per_epoch={d.samples_per_epoch} must be a multiple of "
                             f"ddpo.sample_batch_size={d.sample_batch_size}")
        if d.sample_batch_size % d.images_per_prompt:
            raise ValueError(f"ddpo.sample_batch_size={d.sample_batch_size} must be a multiple of "
                             f"ddpo.images_per_prompt={d.images_per_prompt} (a batch holds whole groups)")
        if d.images_per_prompt > 1 and not d.per_prompt_advantages:
            raise ValueError("ddpo.images_per_prompt > 1 groups trajectories for per-prompt advantages: it needs "
                             "ddpo.per_prompt_advantages: true")
        per_update = t.micro_batch_size * t.grad_accum_steps
        if d.samples_per_epoch % per_update:
            raise ValueError(f"ddpo.samples_per_epoch={d.samples_per_epoch} must be a multiple of "
                             f"train.micro_batch_size x train.grad_accum_steps = {per_update}")
        return self


def preflight(cfg: DDPOTrainConfig, model_path: str) -> None:
    """Driver-side checks before Ray starts: the prompts, the reward's name and options, and (for a local
    model dir) the sampling steps left to train."""
    from diffray.trainers.components.prompts import read_prompts
    from diffray.trainers.components.rewards import REWARDS

    prompts = read_prompts(cfg.ddpo.prompts, cfg.ddpo.prompts_file, "ddpo.prompts_file")
    r = cfg.ddpo.reward
    if r.name == "world_alignment":  # the reader scores world prompts only: say which one is not, before Ray
        from diffray.world.grammar import parse_prompt

        for prompt in prompts:
            try:
                parse_prompt(prompt)
            except ConfigError as exc:
                raise ConfigError(f"world_alignment scores prompts of the shapes world: {exc}",
                                  field="ddpo.prompts_file" if cfg.ddpo.prompts_file else "ddpo.prompts") from None
    if r.name not in REWARDS:
        raise ConfigError(f"unknown reward {r.name!r} (allowed: {', '.join(sorted(REWARDS))})",
                          field="ddpo.reward.name")
    try:
        inspect.signature(REWARDS[r.name]).bind(**r.options)
    except TypeError as exc:
        raise ConfigError(f"{r.name}: {exc}", field="ddpo.reward.options") from None
    if (Path(model_path) / "scheduler" / "scheduler_config.json").is_file():
        from diffusers import DDPMScheduler

        from diffray.trainers.components.ddpo import ddim_scheduler
        from diffray.trainers.components.ddpo_steps import sampled_steps

        noise = DDPMScheduler.from_pretrained(model_path, subfolder="scheduler")
        sampled_steps(cfg.ddpo, ddim_scheduler(noise, cfg.ddpo.timestep_spacing))


def dataset_sources(cfg: DDPOTrainConfig, model_path: str) -> dict[str, DataSource]:
    """No datasets: DDPO samples its own images."""
    return {}


def reward_actor_cpus(cfg: DDPOTrainConfig) -> float:
    """CPUs the reward actor pool holds beside the training workers."""
    return cfg.ddpo.reward.actors * cfg.ddpo.reward.num_cpus


def _task() -> type:
    from diffray.trainers.ddpo.task import DDPOTask

    return DDPOTask


METHOD = Method(name="ddpo", config=DDPOTrainConfig, task=_task, preflight=preflight, dataset_sources=dataset_sources,
                step_metric=("reward_mean", "max", "DDPO trials report the epoch's mean reward"),
                side_cpus=reward_actor_cpus)
