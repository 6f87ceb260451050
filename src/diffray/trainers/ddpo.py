"""DDPO reward alignment (Black et al., 2023) on Ray Train: LoRA on the UNet trained with PPO's clipped
objective over stochastic DDIM trajectories, scored by a reward instead of fitted to a dataset.

One run step is one DDPO epoch on every worker: sample `ddpo.samples_per_epoch` trajectories in batches,
decode them and hand each batch to a pool of reward actors without waiting (the next batch samples while
the last is scored); gather every rank's (prompt, reward) so the per-prompt stat tracker is the same on
all ranks; then `inner_epochs` PPO passes over a random `timestep_fraction` of each sample's steps
through the shared engine (DeepSpeed ZeRO or DDP). The shared loop (`loop.py`) steps over a dataset, so
the epoch loop lives here; engine, resume, metrics, fault hooks, checkpoints and the LoRA artifact are the
shared ones (`engine`, `session`, `export_lora`). The math is in `components.ddpo`; rewards in
`components.rewards`.
"""

from __future__ import annotations

import inspect
import math
import tempfile
from collections import deque
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from diffray.config import DDPOSection, DDPOTrainConfig, RewardSection
from diffray.errors import ConfigError, TrainingError
from diffray.models.adapters import export_lora
from diffray.models.loading import load_components
from diffray.trainers import session
from diffray.trainers.components.ddpo import (
    PerPromptStatTracker,
    Trajectory,
    batch_advantages,
    best_and_worst,
    clipped_policy_loss,
    ddim_scheduler,
    draw_prompts,
    sample_trajectory,
    transition_log_prob,
)
from diffray.trainers.components.rewards import REWARDS, get_reward
from diffray.trainers.engine import build_engine
from diffray.trainers.lora import build_model

FAULT_HOLD_S = 2.0  # the faulted reward call waits this long in the actor so the kill lands mid-call


# ------------------------------------------------------------------------------------------ driver side


def read_prompts(d: DDPOSection) -> list[str]:
    """`ddpo.prompts_file`'s non-blank lines when set, else `ddpo.prompts`."""
    if d.prompts_file is None:
        return list(d.prompts)
    path = Path(d.prompts_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts file not found: {path}", field="ddpo.prompts_file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{path} holds no prompts", field="ddpo.prompts_file")
    return prompts


def preflight(cfg: DDPOTrainConfig, model_path: str) -> None:
    """Driver-side checks before Ray starts: the prompts and the reward's name and options."""
    read_prompts(cfg.ddpo)
    r = cfg.ddpo.reward
    if r.name not in REWARDS:
        raise ConfigError(f"unknown reward {r.name!r} (allowed: {', '.join(sorted(REWARDS))})",
                          field="ddpo.reward.name")
    try:
        inspect.signature(REWARDS[r.name]).bind(**r.options)
    except TypeError as exc:
        raise ConfigError(f"{r.name}: {exc}", field="ddpo.reward.options") from None


def dataset_sources(cfg: DDPOTrainConfig, model_path: str) -> dict:
    """No datasets: DDPO samples its own images."""
    return {}


# ------------------------------------------------------------------------------------------ reward actors


@ray.remote
class RewardActor:
    """Holds one built reward (a model-based one loads its model once) and scores image batches."""

    def __init__(self, name: str, options: dict[str, Any], threads: int):
        torch.set_num_threads(threads)
        self.reward = get_reward(name, **options)

    def ready(self) -> bool:
        return True

    def restarted(self) -> bool:
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)

    def score(self, images: np.ndarray, prompts: list[str], hold_s: float = 0.0) -> np.ndarray:
        if hold_s:
            time.sleep(hold_s)
        return self.reward(images, prompts, None)


@dataclass
class PendingScore:
    """A batch handed to the pool: the actor's ObjectRef (or the inline result) and what to resubmit."""

    actor: int
    ref: Any
    images: np.ndarray
    prompts: list[str]


class RewardPool:
    """Scores image batches on a pool of Ray actors, round-robin and asynchronously, or inline on the
    worker when the pool is empty. A call whose actor died (RayActorError) is resubmitted to the same,
    restarted actor up to `retries` times."""

    def __init__(self, actors: list, reward_fn, retries: int, offset: int = 0):
        self.actors, self.reward_fn, self.retries = actors, reward_fn, retries
        self.next = offset
        self.resubmitted = 0

    def submit(self, images: np.ndarray, prompts: list[str], hold_s: float = 0.0) -> PendingScore:
        if not self.actors:
            return PendingScore(-1, self.reward_fn(images, prompts, None), images, prompts)
        i = self.next % len(self.actors)
        self.next += 1
        return PendingScore(i, self.actors[i].score.remote(images, prompts, hold_s), images, prompts)

    def result(self, pending: PendingScore) -> np.ndarray:
        if pending.actor < 0:
            return pending.ref
        for attempt in range(self.retries + 1):
            try:
                return np.asarray(ray.get(pending.ref), dtype=np.float32)
            except ray.exceptions.RayActorError as exc:
                if attempt == self.retries:
                    raise TrainingError(f"reward actor {pending.actor} died {attempt + 1} times scoring one batch "
                                        f"({type(exc).__name__}); raise ddpo.reward.retries/max_restarts") from None
                self.resubmitted += 1
                pending.ref = self.actors[pending.actor].score.remote(pending.images, pending.prompts)
        raise AssertionError("unreachable")

    def restarted_actors(self) -> int:
        """How many of the pool's actors have been restarted at least once."""
        return sum(ray.get([a.restarted.remote() for a in self.actors])) if self.actors else 0


def open_reward_pool(r: RewardSection, env: session.WorkerEnv) -> RewardPool:
    """The reward pool shared by all ranks: rank 0 creates named actors (owned by it, so they end with
    the worker group) and the others look them up; inline scoring when `r.actors` is 0."""
    if r.actors == 0:
        return RewardPool([], get_reward(r.name, **r.options), r.retries)
    prefix = broadcast_from_main(f"diffray-ddpo-reward-{uuid.uuid4().hex[:12]}" if env.is_main else None)
    names = [f"{prefix}-{i}" for i in range(r.actors)]
    if env.is_main:
        # "DEFAULT": the pool takes its own resources, never a bundle of an enclosing placement group
        # (inside a Tune trial, child actors would otherwise be captured by the trial's group and wait).
        opts = dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_restarts=r.max_restarts, max_task_retries=0,
                    scheduling_strategy="DEFAULT")
        actors = [RewardActor.options(name=n, **opts).remote(r.name, r.options, max(1, int(r.num_cpus)))
                  for n in names]
        try:
            ray.get([a.ready.remote() for a in actors], timeout=r.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TrainingError(f"{r.actors} reward actor(s) of {r.num_cpus:g} CPU / {r.num_gpus:g} GPU did not start "
                                f"in {r.start_timeout_s:g}s: the cluster has no room beside the training workers; "
                                "lower ddpo.reward.num_cpus/num_gpus or scaling.cpus_per_worker") from None
    if dist.is_initialized():
        dist.barrier()
    if not env.is_main:
        actors = [ray.get_actor(n) for n in names]
    return RewardPool(actors, None, r.retries, offset=env.rank)


# ------------------------------------------------------------------------------------------ collectives


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# ------------------------------------------------------------------------------------------ the policy


class EngineUNet:
    """The engine-wrapped LoRA UNet with the call signature `guided_noise_pred` expects, so sampling and
    PPO forwards go through DeepSpeed/DDP (ZeRO-3 gathers weights inside forward)."""

    def __init__(self, engine, unet: torch.nn.Module):
        self.engine, self.unet = engine, unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def config(self):
        return self.unet.config

    def __call__(self, x, t, encoder_hidden_states):
        return SimpleNamespace(sample=self.engine(x, t, encoder_hidden_states=encoder_hidden_states))


@dataclass
class EpochSamples:
    """One worker's epoch: trajectories concatenated over sampling batches, their prompts and images."""

    trajectory: Trajectory
    embeds: torch.Tensor
    prompts: list[str]
    images: np.ndarray  # uint8 [N, H, W, 3]
    rewards: np.ndarray  # float32 [N]


def encode_prompts(comps, prompts: list[str], device) -> torch.Tensor:
    """Frozen text-encoder states [B, 77, D] of `prompts`."""
    ids = comps.tokenizer(prompts, padding="max_length", truncation=True, max_length=comps.tokenizer.model_max_length,
                          return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        return comps.text_encoder(ids)[0]


@torch.no_grad()
def decode_images(vae, latents: torch.Tensor) -> np.ndarray:
    """Final latents -> uint8 RGB [B, H, W, 3] (what a reward and an image file see)."""
    pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample.float()
    pixels = (pixels / 2 + 0.5).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def merge(trajectories: list[Trajectory]) -> Trajectory:
    first = trajectories[0]
    return Trajectory(torch.cat([t.latents for t in trajectories]), first.timesteps,
                      torch.cat([t.log_probs for t in trajectories]))


class DDPOWorker:
    """Everything one worker holds: frozen components, the LoRA policy, its engine, prompts and rewards."""

    def __init__(self, cfg: DDPOTrainConfig, model_path: str, env: session.WorkerEnv):
        self.cfg, self.env, self.d = cfg, env, cfg.ddpo
        self.comps = load_components(model_path)
        self.module = build_model(cfg, self.comps).to(env.device)  # LoRA on the UNet; text encoder frozen
        for frozen in (self.comps.vae, self.comps.text_encoder):
            frozen.requires_grad_(False)
            session.place_frozen(frozen, env)
        self.prompts = read_prompts(self.d)
        self.scheduler = ddim_scheduler(self.comps.noise_scheduler)
        self.negative = encode_prompts(self.comps, [self.d.negative_prompt], env.device)
        size = (self.d.resolution // 8,) * 2 if self.d.resolution else None
        self.latents_shape = (self.comps.unet.config.in_channels, *size) if size else None
        self.train_timesteps = max(1, int(self.d.sample_steps * self.d.timestep_fraction))
        t = cfg.train
        per_update = t.micro_batch_size * t.grad_accum_steps
        self.updates_per_epoch = self.d.inner_epochs * self.d.samples_per_epoch // per_update
        # Each PPO micro-batch backpropagates once per trained timestep: those accumulate into one update.
        self.engine = build_engine(self.module, cfg.strategy, cfg.optim, t.micro_batch_size,
                                   t.grad_accum_steps * self.train_timesteps, t.max_steps * self.updates_per_epoch,
                                   env.precision, env.device)
        self.policy = EngineUNet(self.engine, self.module.unet)
        self.tracker = (PerPromptStatTracker(self.d.stat_buffer_size, self.d.stat_min_count)
                        if self.d.per_prompt_advantages else None)
        self.pool = open_reward_pool(self.d.reward, env)

    def key(self, epoch: int, *more: int) -> list[int]:
        return [self.cfg.run.seed, epoch, self.env.rank, *more]

    def sample_epoch(self, epoch: int, kill_actor: bool) -> tuple[EpochSamples, dict[str, float]]:
        """Sample, decode and submit every batch, then wait for the scores (the overlap is in between)."""
        d, t0 = self.d, time.perf_counter()
        self.pool.resubmitted = 0
        trajectories, embeds, prompts, images, pending = [], [], [], [], []
        self.module.eval()
        for b in range(d.samples_per_epoch // d.sample_batch_size):
            batch_prompts = draw_prompts(self.prompts, d.sample_batch_size, self.key(epoch, b))
            hidden = encode_prompts(self.comps, batch_prompts, self.env.device)
            gen = torch.Generator().manual_seed(hash_key(self.key(epoch, b, 1)))
            traj = sample_trajectory(self.policy, self.scheduler, hidden, self.negative, d.sample_steps, d.guidance,
                                     d.eta, gen, self.latents_shape)
            batch_images = decode_images(self.comps.vae, traj.final_latents)
            fault = kill_actor and b == 0 and bool(self.pool.actors)
            pending.append(self.pool.submit(batch_images, batch_prompts, FAULT_HOLD_S if fault else 0.0))
            if fault:
                time.sleep(FAULT_HOLD_S / 4)  # the call is running in the actor now
                ray.kill(self.pool.actors[pending[-1].actor], no_restart=False)
            trajectories.append(traj)
            embeds.append(hidden)
            prompts += batch_prompts
            images.append(batch_images)
        self.module.train()
        t1 = time.perf_counter()
        rewards = np.concatenate([self.pool.result(p) for p in pending])
        t2 = time.perf_counter()
        samples = EpochSamples(merge(trajectories), torch.cat(embeds), prompts, np.concatenate(images), rewards)
        return samples, {"sample_time": t1 - t0, "reward_wait_time": t2 - t1}

    def advantages(self, samples: EpochSamples) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        """This rank's advantages from every rank's rewards (the same tracker update on all ranks)."""
        gathered = gather_objects((samples.prompts, samples.rewards.tolist()))
        prompts = [p for ps, _ in gathered for p in ps]
        rewards = np.asarray([r for _, rs in gathered for r in rs], dtype=np.float32)
        adv = batch_advantages(prompts, rewards, self.tracker)
        n = len(samples.prompts)
        mine = torch.from_numpy(adv[self.env.rank * n:(self.env.rank + 1) * n]).to(self.env.device)
        return mine, rewards, prompts

    def ppo_passes(self, epoch: int, samples: EpochSamples, adv: torch.Tensor) -> dict[str, float]:
        """`inner_epochs` passes of clipped PPO updates over a random subset of each sample's timesteps."""
        d, mb = self.d, self.cfg.train.micro_batch_size
        traj, n, steps = samples.trajectory, len(samples.prompts), self.d.sample_steps
        gen = torch.Generator().manual_seed(hash_key(self.key(epoch, 2)))
        sums = {"loss": 0.0, "approx_kl": 0.0, "clip_fraction": 0.0}
        count = 0
        for _ in range(d.inner_epochs):
            perm = torch.randperm(n, generator=gen)
            for start in range(0, n, mb):
                idx = perm[start:start + mb]
                cols = torch.stack([torch.randperm(steps, generator=gen) for _ in idx])[:, :self.train_timesteps]
                for j in range(self.train_timesteps):
                    c = cols[:, j]
                    log_prob = transition_log_prob(self.policy, self.scheduler, traj.states[idx, c],
                                                   traj.next_latents[idx, c], traj.timesteps[c],
                                                   samples.embeds[idx], self.negative, d.guidance, d.eta)
                    loss, kl, clip = clipped_policy_loss(log_prob, traj.log_probs[idx, c], adv[idx], d.clip_range,
                                                         d.adv_clip_max)
                    self.engine.backward(loss)
                    self.engine.step()
                    sums["loss"] += float(loss.detach())
                    sums["approx_kl"] += float(kl)
                    sums["clip_fraction"] += float(clip)
                    count += 1
        return {k: session.global_mean(torch.tensor(v / count)) for k, v in sums.items()}

    def best_worst_grid(self, samples: EpochSamples):
        """Rank 0: a grid of the epoch's best (top row) and worst (bottom row) samples over all ranks."""
        from PIL import Image

        from diffray.images import make_grid

        k = self.d.grid_images
        best, worst = best_and_worst(samples.rewards, k)
        mine = [(float(samples.rewards[i]), samples.images[i]) for i in dict.fromkeys(best + worst)]
        pooled = [item for part in gather_objects(mine) for item in part]
        if not self.env.is_main:
            return None
        scores = np.asarray([s for s, _ in pooled])
        top, bottom = best_and_worst(scores, k)
        rows = [[Image.fromarray(pooled[i][1]) for i in ids] for ids in (top, bottom)]
        return make_grid(rows, labels=[f"best {scores[top[0]]:.3g}", f"worst {scores[bottom[0]]:.3g}"])


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


def train_loop_per_worker(config: dict) -> None:
    cfg = DDPOTrainConfig.model_validate(config["cfg"])
    model_path, log_dir, status = config["model_path"], config["log_dir"], config.get("status_actor")
    env = session.worker_env(cfg.train.mixed_precision, cfg.scaling.use_gpu, cfg.scaling.cpus_per_worker)
    t = cfg.train

    # --- setup
    w = DDPOWorker(cfg, model_path, env)
    state = session.restore(w.engine) or {"step": 0, "first_losses": [], "recent_losses": []}
    if w.tracker is not None:
        w.tracker.buffers = {p: deque(v, maxlen=w.tracker.buffer_size) for p, v in state.get("tracker", {}).items()}
    start = state["step"]
    logger = session.MetricsLogger(log_dir, env.is_main, t.max_steps, start, config.get("progress_bar", False))
    logger.event(event="start", method=cfg.method, resumed_from_step=start, world_size=env.world_size,
                 precision=env.precision, strategy=cfg.strategy.name, zero_stage=cfg.strategy.zero_stage,
                 reward=cfg.ddpo.reward.name, reward_actors=cfg.ddpo.reward.actors)

    # --- train: one step = one DDPO epoch
    for epoch in range(start + 1, t.max_steps + 1):
        t0 = time.perf_counter()
        session.maybe_kill_rank(cfg.faults, env, epoch, log_dir)
        session.seed_step(cfg.run.seed, epoch, env.rank)
        samples, times = w.sample_epoch(epoch, env.is_main and cfg.faults.kill_reward_actor_at_step == epoch)
        adv, rewards, prompts = w.advantages(samples)
        t1 = time.perf_counter()
        ppo = w.ppo_passes(epoch, samples, adv)
        elapsed = time.perf_counter() - t0
        if not math.isfinite(ppo["loss"]):
            logger.event(event="nonfinite_loss", step=epoch, loss=ppo["loss"])
            if env.is_main and status is not None:
                ray.get(status.set.remote("nonfinite_loss_step", epoch))
            logger.close()
            return
        state = session.advance_state(state, epoch, ppo["loss"], elapsed)
        reward_mean = float(rewards.mean())
        state = {**state, "reward_first_mean": state.get("reward_first_mean", reward_mean),
                 "reward_last_mean": reward_mean,
                 "tracker": {p: list(b) for p, b in w.tracker.buffers.items()} if w.tracker else {}}
        do_log, do_grid, do_ckpt = session.schedule(t, epoch)
        retries = session.global_mean(torch.tensor(float(w.pool.resubmitted))) * env.world_size
        metrics = {**epoch_metrics(epoch, rewards, prompts), **ppo, "lr": w.engine.lr,
                   "grad_norm": w.engine.last_grad_norm or 0.0, "epoch_time": elapsed, **times,
                   "train_time": elapsed - (t1 - t0), "samples_per_s": len(rewards) / elapsed,
                   "reward_retries": int(round(retries))}
        if w.pool.actors and (retries > 0 or do_log):
            metrics["reward_actor_restarts"] = w.pool.restarted_actors()
        if do_log or retries > 0:
            logger.step(epoch, metrics)
        if do_grid or epoch == t.max_steps:
            grid = w.best_worst_grid(samples)
            if grid is not None:
                out = Path(log_dir) / "samples" / f"epoch_{epoch:06d}.png"
                out.parent.mkdir(parents=True, exist_ok=True)
                grid.save(out)
                logger.image("best_worst", epoch, grid)
        if do_ckpt:
            report = {**session.summary_metrics(state), "reward_mean": reward_mean}
            artifact = None
            if epoch == t.max_steps:  # --- save: the final checkpoint carries the exported adapter
                with w.engine.gathered():
                    if env.is_main:
                        card = {**session.card(cfg, model_path, state),
                                "reward": {"name": cfg.ddpo.reward.name, "options": cfg.ddpo.reward.options,
                                           "first_epoch_mean": state["reward_first_mean"],
                                           "last_epoch_mean": reward_mean}}
                        card["metrics"] = report
                        artifact = export_lora(Path(tempfile.mkdtemp(prefix="diffray-artifact-")), w.module.unet,
                                               None, card)
            session.save_checkpoint(w.engine, env, state, report, cfg.faults, log_dir, artifact)
        elif config.get("report_validation"):  # a Tune trial: every epoch's reward reaches the scheduler
            ray.train.report({**session.summary_metrics(state), "reward_mean": reward_mean})  # collective

    # --- cleanup
    logger.event(event="end", step=state["step"])
    logger.close()
    if dist.is_initialized():
        dist.barrier()
