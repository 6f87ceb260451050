"""DDPO in the shared loop: one loop step is one DDPO epoch on every worker.

Sample `ddpo.samples_per_epoch` stochastic DDIM trajectories in batches, decode them and hand each batch
to the reward pool without waiting; gather every rank's (prompt, reward) so the per-prompt stat tracker
is the same on all ranks; then `inner_epochs` PPO passes over a random `timestep_fraction` of each
sample's trained steps (those with sigma_t >= `min_step_std`) through the shared engine (DeepSpeed ZeRO or
DDP), with `kl_coef` x each step's KL to the base model (the LoRA switched off) added to the loss when it is
set. Everything around the epoch (resume, NaN stop, logging, grids, checkpoints, the LoRA artifact, Tune
reports) is the shared loop's. The math is in `components.ddpo` and `components.ddpo_steps`, the rewards in
`components.rewards`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from diffray.models.adapters import export_lora
from diffray.models import speed
from diffray.models.family import family_of
from diffray.trainers import hooks, session
from diffray.trainers.components.ddpo import (
    PerPromptStatTracker,
    Trajectory,
    batch_advantages,
    best_and_worst,
    clipped_policy_loss,
    cat_conditioning,
    ddim_scheduler,
    draw_prompts,
    index_conditioning,
    sample_trajectory,
    transition_terms,
)
from diffray.trainers.components.ddpo_steps import sampled_steps, train_columns
from diffray.trainers.components.prompts import read_prompts
from diffray.trainers.ddpo.pool import open_reward_pool
from diffray.trainers.denoising import adapters_off, lora_denoiser


class EngineUNet:
    """The engine-wrapped LoRA UNet with the call signature `guided_noise_pred` expects (the conditioning as
    keyword arguments), so sampling and PPO forwards go through DeepSpeed/DDP (ZeRO-3 gathers weights inside
    forward)."""

    def __init__(self, engine, unet: torch.nn.Module):
        self.engine, self.unet = engine, unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def config(self):
        return self.unet.config

    def __call__(self, x, t, **conditioning):
        return SimpleNamespace(sample=self.engine(x, t, **conditioning))


class ReferenceUNet:
    """The LoRA UNet with its adapters switched off (the base model, DDPO's KL reference): no second copy."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def __call__(self, x, t, **conditioning):
        with adapters_off(self.unet):
            return self.unet(x, t, **conditioning)


@dataclass
class EpochSamples:
    """One worker's epoch: trajectories concatenated over sampling batches, their prompts and images."""

    trajectory: Trajectory
    embeds: dict  # the prompts' conditioning (`components.ddpo.as_conditioning`), batch N
    prompts: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]
    rewards: np.ndarray  # float32 [N]


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor) -> np.ndarray:
    """Final latents -> uint8 RGB [B, H, W, 3] (what a reward and an image file see)."""
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()
    pixels = (pixels / 2 + 0.5).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def stat_tracker(d) -> PerPromptStatTracker | None:
    """The per-prompt advantage tracker of a `ddpo` section (None: normalise over each epoch's batch). With
    `images_per_prompt` > 1 every drawn prompt has at least a group's rewards, so it is normalised per prompt
    from its first epoch on."""
    if not d.per_prompt_advantages:
        return None
    group = d.images_per_prompt
    return PerPromptStatTracker(d.stat_buffer_size, min(d.stat_min_count, group) if group > 1 else d.stat_min_count)


def merge(trajectories: list[Trajectory]) -> Trajectory:
    first = trajectories[0]
    return Trajectory(torch.cat([t.latents for t in trajectories]), first.timesteps,
                      torch.cat([t.log_probs for t in trajectories]))


class DDPOTask:
    """DDPO in the shared loop (see `diffray.trainers.loop.Task`): frozen parts, the LoRA policy, prompts,
    the reward pool and the per-prompt stat tracker of one worker."""

    grid_path = "samples/epoch_{step:06d}.png"
    grid_tag = "best_worst"
    collective_grid = True  # the best/worst grid gathers samples from every rank
    step_reports = True  # every epoch's reward reaches a Tune scheduler

    def __init__(self, cfg, model_path: str, env: session.WorkerEnv):
        self.cfg, self.env, self.d = cfg, env, cfg.ddpo
        self.family = family_of(model_path)
        self.comps = self.family.load(model_path)
        self.module = lora_denoiser(self.comps, cfg.lora, cfg.run.seed, cfg.train.gradient_checkpointing).to(env.device)
        speed.apply_to_children(self.module, cfg.train)
        for frozen in (self.comps.vae, self.comps.text_encoder, self.comps.text_encoder_2):
            if frozen is None:
                continue
            frozen.requires_grad_(False)
            session.place_frozen(frozen, env)
        self.prompts = read_prompts(self.d.prompts, self.d.prompts_file, "ddpo.prompts_file")
        self.scheduler = ddim_scheduler(self.comps.noise_scheduler, self.d.timestep_spacing)
        self.trained = torch.tensor(sampled_steps(self.d, self.scheduler))  # step indices to train
        unet, scale = self.comps.unet.config, 2 ** (len(self.comps.vae.config.block_out_channels) - 1)
        pixels = self.d.resolution or unet.sample_size * scale
        self.pixel_size = (pixels, pixels)  # SDXL's target-size conditioning
        self.latents_shape = (unet.in_channels, pixels // scale, pixels // scale)
        self.negative = self.prompt_conditioning([self.d.negative_prompt])
        self.train_timesteps = max(1, int(len(self.trained) * self.d.timestep_fraction))
        self.tracker = stat_tracker(self.d)
        self.pool = open_reward_pool(self.d.reward, env)
        self.engine = self.policy = self.samples = None
        self.reward_first = self.reward_last = None

    @torch.no_grad()
    def prompt_conditioning(self, prompts: list[str]) -> dict:
        """The frozen encoders' conditioning of `prompts` (SDXL's: both encoders, pooled, size ids)."""
        ids = self.family.tokenize(self.comps, prompts).to(self.env.device)
        return self.family.conditioning(self.comps, ids, {}, self.pixel_size)

    @property
    def grad_accum_steps(self) -> int:
        # Each PPO micro-batch backpropagates once per trained timestep: those accumulate into one update.
        return self.cfg.train.grad_accum_steps * self.train_timesteps

    @property
    def optimizer_steps(self) -> int:
        t = self.cfg.train
        updates_per_epoch = self.d.inner_epochs * self.d.samples_per_epoch // (t.micro_batch_size * t.grad_accum_steps)
        return t.max_steps * updates_per_epoch

    def start(self, engine, state: dict) -> None:
        self.engine = engine
        self.policy = EngineUNet(engine, self.module.unet)
        self.reference = ReferenceUNet(self.module.unet) if self.d.kl_coef > 0 else None

    def load_state(self, state: dict) -> None:
        if self.tracker is not None:
            self.tracker.buffers = {p: deque(v, maxlen=self.tracker.buffer_size)
                                    for p, v in state.get("tracker", {}).items()}
        self.reward_first = state.get("reward_first_mean")
        self.reward_last = state.get("reward_last_mean")

    def state(self) -> dict:
        tracker = {p: list(b) for p, b in self.tracker.buffers.items()} if self.tracker else {}
        return {"reward_first_mean": self.reward_first, "reward_last_mean": self.reward_last, "tracker": tracker}

    def report_metrics(self) -> dict:
        return {"reward_mean": self.reward_last}

    def train_step(self, engine, epoch: int) -> session.StepOutput:
        """One DDPO epoch: sample and score, advantages over all ranks, PPO passes."""
        t0 = time.perf_counter()
        samples, times = self.sample_epoch(epoch)
        adv, rewards, prompts = self.advantages(samples)
        t1 = time.perf_counter()
        ppo = self.ppo_passes(epoch, samples, adv)
        if not math.isfinite(ppo["loss"]):  # a mean over ranks: every rank stops here
            raise session.NonFiniteLoss(epoch, ppo["loss"])
        elapsed = time.perf_counter() - t0
        self.samples, self.reward_last = samples, float(rewards.mean())
        self.reward_first = self.reward_last if self.reward_first is None else self.reward_first
        retries = session.global_mean(torch.tensor(float(self.pool.resubmitted))) * self.env.world_size
        metrics = {**epoch_metrics(epoch, rewards, prompts), **ppo, "epoch_time": elapsed, **times,
                   "train_time": elapsed - (t1 - t0), "samples_per_s": len(rewards) / elapsed,
                   "reward_retries": int(round(retries))}
        if self.pool.actors:
            metrics["reward_actor_restarts"] = self.pool.restarted_actors()
        return session.StepOutput(ppo["loss"], metrics, force_log=retries > 0)

    def key(self, epoch: int, *more: int) -> list[int]:
        return [self.cfg.run.seed, epoch, self.env.rank, *more]

    def batch_prompts(self, epoch: int, batch: int) -> list[str]:
        """The prompts of one sampling batch: drawn by (seed, epoch, rank, batch), in groups of `images_per_prompt`."""
        return draw_prompts(self.prompts, self.d.sample_batch_size, self.key(epoch, batch), self.d.images_per_prompt)

    def sample_epoch(self, epoch: int) -> tuple[EpochSamples, dict[str, float]]:
        """Sample, decode and submit every batch, then wait for the scores (the overlap is in between)."""
        d, t0 = self.d, time.perf_counter()
        self.pool.resubmitted = 0
        trajectories, embeds, prompts, images, pending = [], [], [], [], []
        self.module.eval()
        for b in range(d.samples_per_epoch // d.sample_batch_size):
            batch_prompts = self.batch_prompts(epoch, b)
            hidden = self.prompt_conditioning(batch_prompts)
            gen = torch.Generator().manual_seed(hash_key(self.key(epoch, b, 1)))
            traj = sample_trajectory(self.policy, self.scheduler, hidden, self.negative, d.sample_steps, d.guidance,
                                     d.eta, gen, self.latents_shape)
            batch_images = decode_images(self.comps.vae, traj.final_latents)
            actor = self.pool.next_actor()
            if actor is not None:
                hooks.current().before_reward_call(self.env.rank, epoch, b, actor)
            pending.append(self.pool.submit(batch_images, batch_prompts))
            if actor is not None:
                hooks.current().after_reward_call(self.env.rank, epoch, b, actor)
            trajectories.append(traj)
            embeds.append(hidden)
            prompts += batch_prompts
            images.append(batch_images)
        self.module.train()
        t1 = time.perf_counter()
        rewards = np.concatenate([self.pool.result(p) for p in pending])
        t2 = time.perf_counter()
        samples = EpochSamples(merge(trajectories), cat_conditioning(embeds), prompts, np.concatenate(images), rewards)
        return samples, {"sample_time": t1 - t0, "reward_wait_time": t2 - t1}

    def advantages(self, samples: EpochSamples) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        """This rank's advantages from every rank's rewards (the same tracker update on all ranks)."""
        gathered = session.gather_objects((samples.prompts, samples.rewards.tolist()))
        prompts = [p for ps, _ in gathered for p in ps]
        rewards = np.asarray([r for _, rs in gathered for r in rs], dtype=np.float32)
        adv = batch_advantages(prompts, rewards, self.tracker)
        n = len(samples.prompts)
        mine = torch.from_numpy(adv[self.env.rank * n:(self.env.rank + 1) * n]).to(self.env.device)
        return mine, rewards, prompts

    def ppo_passes(self, epoch: int, samples: EpochSamples, adv: torch.Tensor) -> dict[str, float]:
        """`inner_epochs` passes of clipped PPO updates over a random subset of each sample's trained steps."""
        d, mb = self.d, self.cfg.train.micro_batch_size
        traj, n = samples.trajectory, len(samples.prompts)
        gen = torch.Generator().manual_seed(hash_key(self.key(epoch, 2)))
        sums = {"loss": 0.0, "approx_kl": 0.0, "clip_fraction": 0.0, **({"kl_ref": 0.0} if self.reference else {})}
        count = 0
        for _ in range(d.inner_epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, mb):
                idx = perm[start:start + mb]
                cols = train_columns(self.trained, self.train_timesteps, len(idx), gen)
                for j in range(self.train_timesteps):
                    c = cols[:, j]
                    log_prob, kl_ref = transition_terms(self.policy, self.scheduler, traj.states[idx, c],
                                                        traj.next_latents[idx, c], traj.timesteps[c],
                                                        index_conditioning(samples.embeds, idx), self.negative,
                                                        d.guidance, d.eta, self.reference)
                    loss, kl, clip = clipped_policy_loss(log_prob, traj.log_probs[idx, c], adv[idx], d.clip_range,
                                                         d.adv_clip_max)
                    if kl_ref is not None:
                        loss = loss + d.kl_coef * kl_ref.mean()
                        sums["kl_ref"] += float(kl_ref.detach().mean())
                    self.engine.backward(loss)
                    self.engine.step()
                    sums["loss"] += float(loss.detach())
                    sums["approx_kl"] += float(kl)
                    sums["clip_fraction"] += float(clip)
                    count += 1
        return {k: session.global_mean(torch.tensor(v / count)) for k, v in sums.items()}

    def validation_grid(self, step: int):
        """Rank 0: a grid of the epoch's best (top row) and worst (bottom row) samples over all ranks."""
        from PIL import Image

        from diffray.images import make_grid

        samples, k = self.samples, self.d.grid_images
        best, worst = best_and_worst(samples.rewards, k)
        mine = [(float(samples.rewards[i]), samples.images[i]) for i in dict.fromkeys(best + worst)]
        pooled = [item for part in session.gather_objects(mine) for item in part]
        if not self.env.is_main:
            return None
        scores = np.asarray([s for s, _ in pooled])
        top, bottom = best_and_worst(scores, k)
        rows = [[Image.fromarray(pooled[i][1]) for i in ids] for ids in (top, bottom)]
        return make_grid(rows, labels=[f"best {scores[top[0]]:.3g}", f"worst {scores[bottom[0]]:.3g}"])

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        r = self.d.reward
        card = {**card, "reward": {"name": r.name, "options": r.options, "first_epoch_mean": self.reward_first,
                                   "last_epoch_mean": self.reward_last}}
        return export_lora(out_dir, self.module.unet, None, card)

    def export_raw(self, artifact: Path) -> None:
        """A LoRA file has no place for the trained weights beside the EMA ones."""


def hash_key(key: list[int]) -> int:
    """A 63-bit seed from an integer key (numpy's SeedSequence mixes it)."""
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)


def epoch_metrics(epoch: int, rewards: np.ndarray, prompts: list[str]) -> dict[str, Any]:
    """Reward statistics of one epoch over all ranks, with the per-prompt means."""
    per_prompt: dict[str, list[float]] = {}
    for p, r in zip(prompts, rewards.tolist()):
        per_prompt.setdefault(p, []).append(r)
    return {"step": epoch, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "reward_min": float(rewards.min()), "reward_max": float(rewards.max()),
            "prompt_reward_means": {p: float(np.mean(v)) for p, v in per_prompt.items()}}
