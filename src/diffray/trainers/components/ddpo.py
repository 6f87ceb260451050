"""DDPO (Black et al., 2023, "Training Diffusion Models with Reinforcement Learning"): stochastic DDIM
trajectories with the log-probability of every denoising step, and the PPO pieces that train on them.

Sampling with eta > 0 makes each DDIM step a Gaussian policy x_{t-1} ~ N(mean_theta(x_t, t), sigma_t^2),
so the UNet's per-step log-probabilities give a policy gradient. The PPO update recomputes a stored
step's log-probability with `transition_log_prob` and must get exactly what sampling recorded when the
weights have not changed (ratio 1): both go through `guided_noise_pred` and `ddim_step_with_logprob`.

Log-probabilities are the MEAN over all non-batch dims of the per-element Gaussian log-density (as the
reference implementation, kvablack/ddpo-pytorch, and trl's DDPOTrainer do), not the sum: the sum is the
true log-density of the step but scales with the latent size, and DDPO's tiny clip range (1e-4) is tuned
for ratios exp(mean difference). Randomness comes only from the caller's `torch.Generator`, drawn on the
generator's device and moved, so a seed gives the same trajectory on any device. Never imports ray or
deepspeed.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class Trajectory:
    """A batch of sampled denoising chains.

    latents: [B, T+1, C, H, W] the states x_T (initial noise), ..., x_0 (final latents), fp32.
    timesteps: [T] the scheduler timestep of each step (the same for every sample).
    log_probs: [B, T] log-probability of step j's transition latents[:, j] -> latents[:, j+1].
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor

    @property
    def states(self) -> torch.Tensor:
        """[B, T, C, H, W]: the input x_t of every step."""
        return self.latents[:, :-1]

    @property
    def next_latents(self) -> torch.Tensor:
        """[B, T, C, H, W]: the output x_{t-1} of every step."""
        return self.latents[:, 1:]

    @property
    def final_latents(self) -> torch.Tensor:
        """[B, C, H, W]: x_0, to decode with the VAE."""
        return self.latents[:, -1]


def ddim_scheduler(scheduler, timestep_spacing: str | None = None):
    """A `DDIMScheduler` with the noise schedule of `scheduler` (e.g. a model's training DDPMScheduler), and its
    timestep spacing unless `timestep_spacing` ("leading" | "trailing" | "linspace") says otherwise."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(scheduler.config, **({"timestep_spacing": timestep_spacing}
                                                           if timestep_spacing else {}))


def step_std(scheduler, timestep, eta: float) -> torch.Tensor:
    """sigma_t [B] (fp32) of the DDIM step x_t -> x_{t-1} at `timestep` (an int or [B]) after `set_timesteps`:
    eta times the DDPM posterior's std between the two timesteps."""
    return _std(*_step_alphas(scheduler, timestep), eta)


def _std(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    return eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()


def _step_alphas(scheduler, timestep) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha-bar at t, alpha-bar at the previous timestep, or the final one after the last) [B] fp32."""
    t = torch.as_tensor(timestep).detach().to("cpu", torch.long).reshape(-1)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    return alphas[t], torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)],
                                  torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32))


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[N] (N = 1 or B) -> [N, 1, ..., 1] fp32 on `like`'s device, broadcastable against `like`."""
    return values.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def ddim_step_with_logprob(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float,
                           prev_sample: torch.Tensor | None = None,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} (DDIM paper eqs. 12 and 16, as `DDIMScheduler.step`) and its log-probability.

    The math runs in fp32. With `prev_sample` None the step samples x_{t-1} = mean + sigma_t * noise, the
    noise drawn from `generator` (the same draw as `DDIMScheduler.step(..., eta, variance_noise=noise)`);
    with `prev_sample` given it only scores that sample (the PPO update).

    Args:
        scheduler: a `DDIMScheduler` after `set_timesteps` (its step size is used).
        model_output: the UNet's (guided) prediction [B, ...] of the scheduler's `prediction_type`.
        timestep: an int / 0-d tensor, or a [B] tensor (one timestep per sample).
        sample: x_t [B, ...].
        eta: DDIM noise weight, > 0 (1 = DDPM's posterior variance).
        prev_sample: x_{t-1} to score instead of sampling one.
        generator: randomness for the sampled x_{t-1}; not allowed with `prev_sample`.

    Returns:
        (x_{t-1} fp32 [B, ...], log_prob fp32 [B]: the mean over non-batch dims of log N(x_{t-1}; mean, sigma_t^2)).
        The log-probability carries gradients to `model_output`; x_{t-1} is treated as a constant.

    Raises:
        ValueError: eta <= 0, `set_timesteps` not called, both `prev_sample` and `generator`, or a step with
            zero variance (a scheduler with `set_alpha_to_one=True` has one at the last step).
    """
    if prev_sample is not None and generator is not None:
        raise ValueError("pass either prev_sample (to score it) or generator (to sample one), not both")
    x = sample.float()
    mean, std = step_mean_and_std(scheduler, model_output, timestep, x, eta)
    if prev_sample is None:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else x.device)
        prev_sample = mean + std * noise.to(x.device)
    prev_sample = prev_sample.detach().float()
    return prev_sample, _gaussian_log_prob(prev_sample, mean, std)


def _gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) [B], the mean over non-batch dims."""
    log_prob = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - HALF_LOG_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def _gaussian_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(reference_mean, std^2)) [B], the mean over non-batch dims."""
    kl = (mean - reference_mean) ** 2 / (2 * std**2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def step_mean_and_std(scheduler, model_output: torch.Tensor, timestep, sample: torch.Tensor,
                      eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [B, ...], std broadcastable [B, 1, ...]) of the Gaussian DDIM step x_t -> x_{t-1}, fp32; the
    mean carries gradients to `model_output`. Raises as `ddim_step_with_logprob`."""
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a stochastic policy with a log-probability, got {eta}")
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(steps) before ddim_step_with_logprob")
    t = torch.as_tensor(timestep).detach().to("cpu", torch.long).reshape(-1)
    alpha_t, alpha_prev = _step_alphas(scheduler, t)
    std = _std(alpha_t, alpha_prev, eta)
    if (std <= 0).any():
        raise ValueError(f"DDIM step at timestep(s) {t[std <= 0].tolist()} has zero variance (no log-probability); "
                         "use a scheduler with set_alpha_to_one=False")
    x, eps_or_v = sample.float(), model_output.float()
    alpha_t, alpha_prev, std = (_per_sample(v, x) for v in (alpha_t, alpha_prev, std))
    x0, eps = _predict_x0_and_eps(scheduler, eps_or_v, x, alpha_t)
    return alpha_prev.sqrt() * x0 + (1 - alpha_prev - std**2).sqrt() * eps, std


def step_kl(scheduler, model_output: torch.Tensor, reference_output: torch.Tensor, timestep, sample: torch.Tensor,
            eta: float) -> torch.Tensor:
    """KL(policy step || reference step) [B] of one DDIM step from `sample`, the mean over non-batch dims (as
    the log-probabilities): both are Gaussians with the same sigma_t, so it is |mean - mean_ref|^2 / (2 sigma_t^2).
    The per-step KL regulariser of DPOK (Fan et al., 2023); gradients reach `model_output` only."""
    mean, std = step_mean_and_std(scheduler, model_output, timestep, sample, eta)
    ref, _ = step_mean_and_std(scheduler, reference_output.detach(), timestep, sample, eta)
    return _gaussian_kl(mean, ref, std)


def _predict_x0_and_eps(scheduler, model_output: torch.Tensor, x: torch.Tensor,
                        alpha_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted x_0, predicted noise) from the model output, clipped/thresholded as the scheduler says."""
    kind, beta_t = scheduler.config.prediction_type, 1 - alpha_t
    if kind == "epsilon":
        x0, eps = (x - beta_t.sqrt() * model_output) / alpha_t.sqrt(), model_output
    elif kind == "sample":
        x0 = model_output
        eps = (x - alpha_t.sqrt() * x0) / beta_t.sqrt()
    elif kind == "v_prediction":
        x0 = alpha_t.sqrt() * x - beta_t.sqrt() * model_output
        eps = alpha_t.sqrt() * model_output + beta_t.sqrt() * x
    else:
        raise ValueError(f"unknown prediction_type {kind!r} (allowed: epsilon, sample, v_prediction)")
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0, eps


def as_conditioning(cond: torch.Tensor | dict) -> dict:
    """The UNet's text conditioning kwargs: `encoder_hidden_states` [B, L, D] and, for SDXL, `added_cond_kwargs`
    ({"text_embeds": [B, P], "time_ids": [B, 6]}), as a family's `conditioning` makes them; a bare tensor
    is SD's `encoder_hidden_states`."""
    return cond if isinstance(cond, dict) else {"encoder_hidden_states": cond}


def map_conditioning(fn, *conds: dict) -> dict:
    """`fn` over matching tensors of (nested) conditioning dicts: {k: fn(a[k], b[k], ...)}."""
    return {k: map_conditioning(fn, *(c[k] for c in conds)) if isinstance(v, dict) else fn(*(c[k] for c in conds))
            for k, v in conds[0].items()}


def cat_conditioning(conds: Sequence[dict]) -> dict:
    """Batches of conditioning, concatenated along the batch dim."""
    return map_conditioning(lambda *xs: torch.cat(xs), *conds)


def index_conditioning(cond: dict, idx) -> dict:
    """The rows `idx` of every tensor in `cond`."""
    return map_conditioning(lambda x: x[idx], cond)


def _conditioning_batch(cond: dict) -> tuple[int, torch.device]:
    hidden = cond["encoder_hidden_states"]
    return hidden.shape[0], hidden.device


def guided_noise_pred(unet, latents: torch.Tensor, timestep, prompt_embeds: torch.Tensor | dict,
                      negative_embeds: torch.Tensor | dict | None, guidance: float) -> torch.Tensor:
    """The UNet prediction at (latents, timestep), with classifier-free guidance when `negative_embeds`
    is given and `guidance` > 1 (one batched forward of [negative; prompt], as diffusers pipelines do).

    Args:
        latents: x_t [B, C, H, W] (cast to the UNet's dtype for the forward).
        timestep: int / 0-d tensor or [B] (one per sample).
        prompt_embeds: the prompts' conditioning (`as_conditioning`): states [B, L, D], or a dict of them
            with SDXL's added conditioning.
        negative_embeds: the same for the negative / empty prompt, batch B or 1; or None (no guidance).
        guidance: the guidance scale w: uncond + w * (cond - uncond).

    Returns:
        fp32 [B, C, H, W].
    """
    b = latents.shape[0]
    t = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(b)
    x = latents.to(unet.dtype)  # DDIM's scale_model_input is the identity, so it is not called
    cast = (lambda v: v.to(unet.dtype) if v.is_floating_point() else v)
    cond = map_conditioning(cast, as_conditioning(prompt_embeds))
    if negative_embeds is None or guidance <= 1.0:
        return unet(x, t, **cond).sample.float()
    both = map_conditioning(lambda n, c: torch.cat([cast(n).expand(b, *n.shape[1:]), c]),
                            as_conditioning(negative_embeds), cond)
    uncond, guided = unet(torch.cat([x, x]), torch.cat([t, t]), **both).sample.float().chunk(2)
    return uncond + guidance * (guided - uncond)


@torch.no_grad()
def sample_trajectory(unet, scheduler, prompt_embeds: torch.Tensor | dict, negative_embeds: torch.Tensor | dict | None,
                      steps: int, guidance: float, eta: float, generator: torch.Generator,
                      latents_shape: Sequence[int] | None = None) -> Trajectory:
    """Sample a batch of DDIM chains from pure noise, recording every state and step log-probability.

    Args:
        unet: a diffusers `UNet2DConditionModel` (any dtype; the chain is kept in fp32).
        scheduler: a `DDIMScheduler` (see `ddim_scheduler`); `set_timesteps(steps)` is called on it.
        prompt_embeds: the prompts' conditioning (`as_conditioning`), batch B; its device is the sampling device.
        negative_embeds: the negative prompt's (batch B or 1) for classifier-free guidance, or None.
        steps: number of denoising steps T.
        guidance: classifier-free guidance scale (ignored without `negative_embeds` or when <= 1).
        eta: DDIM noise weight, > 0.
        generator: the only source of randomness (initial noise, then each step's noise).
        latents_shape: the shape (C, H, W) of ONE latent; default (in_channels, sample_size, sample_size).

    Returns:
        A `Trajectory`: latents [B, T+1, C, H, W], timesteps [T], log_probs [B, T].
    """
    if latents_shape is None:
        size = unet.config.sample_size
        latents_shape = (unet.config.in_channels, *(size if isinstance(size, (tuple, list)) else (size, size)))
    batch, device = _conditioning_batch(as_conditioning(prompt_embeds))
    scheduler.set_timesteps(steps, device=device)
    shape = (batch, *latents_shape)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)
    latents = noise.to(device) * scheduler.init_noise_sigma
    states, log_probs = [latents], []
    for t in scheduler.timesteps:
        pred = guided_noise_pred(unet, latents, t, prompt_embeds, negative_embeds, guidance)
        latents, log_prob = ddim_step_with_logprob(scheduler, pred, t, latents, eta, generator=generator)
        states.append(latents)
        log_probs.append(log_prob)
    return Trajectory(torch.stack(states, dim=1), scheduler.timesteps.clone(), torch.stack(log_probs, dim=1))


def transition_log_prob(unet, scheduler, latents: torch.Tensor, next_latents: torch.Tensor, timestep,
                        prompt_embeds: torch.Tensor | dict, negative_embeds: torch.Tensor | dict | None,
                        guidance: float, eta: float) -> torch.Tensor:
    """Log-probability [B] (with gradients to the UNet) of stored transitions latents -> next_latents under
    the UNet's current weights: the PPO update's new log-probability. `timestep` may differ per sample
    ([B]); `scheduler` must have had `set_timesteps` with the sampling step count."""
    return transition_terms(unet, scheduler, latents, next_latents, timestep, prompt_embeds, negative_embeds,
                            guidance, eta)[0]


def transition_terms(unet, scheduler, latents: torch.Tensor, next_latents: torch.Tensor, timestep,
                     prompt_embeds: torch.Tensor | dict, negative_embeds: torch.Tensor | dict | None, guidance: float,
                     eta: float, reference=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(`transition_log_prob`'s log-probability [B], the step's KL to the reference [B] or None): `reference`
    is the reference model's UNet (called without grad), e.g. the policy with its LoRA switched off."""
    pred = guided_noise_pred(unet, latents, timestep, prompt_embeds, negative_embeds, guidance)
    # the policy's step mean once, for both terms (as `ddim_step_with_logprob` and `step_kl` compute them)
    mean, std = step_mean_and_std(scheduler, pred, timestep, latents, eta)
    log_prob = _gaussian_log_prob(next_latents.detach().float(), mean, std)
    if reference is None:
        return log_prob, None
    with torch.no_grad():
        ref = guided_noise_pred(reference, latents, timestep, prompt_embeds, negative_embeds, guidance)
        ref_mean, _ = step_mean_and_std(scheduler, ref, timestep, latents, eta)
    return log_prob, _gaussian_kl(mean, ref_mean, std)


class PerPromptStatTracker:
    """Reward -> advantage normalisation per prompt (DDPO): each prompt keeps its last `buffer_size`
    rewards; a reward's advantage is (r - mean) / (std + 1e-6) over its prompt's buffer, or over the
    current batch while the prompt has fewer than `min_count` rewards buffered."""

    def __init__(self, buffer_size: int | None, min_count: int):
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: np.ndarray) -> np.ndarray:
        """Add a batch of (prompt, reward) and return the advantages [B] float32 (same order)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        prompts = np.asarray(prompts, dtype=object)
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):  # first-seen order; numpy's unique would sort
            mask = prompts == prompt
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[mask].tolist())
            ref = np.asarray(buffer) if len(buffer) >= self.min_count else rewards
            advantages[mask] = (rewards[mask] - ref.mean()) / (ref.std() + 1e-6)
        return advantages.astype(np.float32)

    def stats(self) -> dict[str, dict[str, float]]:
        """{prompt: {mean, std, count}} of the buffers (for logging)."""
        return {p: {"mean": float(np.mean(b)), "std": float(np.std(b)), "count": len(b)}
                for p, b in self.buffers.items()}


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float, adv_clip_max: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss for one denoising step of a batch (as DDPO's train loop).

    Args:
        log_prob: [B] under the current weights (with gradients).
        old_log_prob: [B] recorded at sampling time.
        advantages: [B], first clamped to [-adv_clip_max, adv_clip_max].
        clip_range: ratio clip epsilon (DDPO: 1e-4).

    Returns:
        (loss = mean(max(-A * r, -A * clip(r, 1-eps, 1+eps))), approx_kl = 0.5 * mean((log_prob - old)^2),
        clip_fraction = mean(|r - 1| > eps)); the last two detached. r = exp(log_prob - old_log_prob).
    """
    adv = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    diff = log_prob - old_log_prob
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl = 0.5 * (diff.detach() ** 2).mean()
    clip_fraction = ((ratio.detach() - 1.0).abs() > clip_range).float().mean()
    return loss, approx_kl, clip_fraction


def batch_advantages(prompts: Sequence[str], rewards: np.ndarray, tracker: PerPromptStatTracker | None) -> np.ndarray:
    """Advantages [B] float32 of one epoch's rewards: per prompt through `tracker` (which it updates), or,
    with no tracker, normalised over the whole batch."""
    if tracker is not None:
        return tracker.update(prompts, rewards)
    rewards = np.asarray(rewards, dtype=np.float64)
    return ((rewards - rewards.mean()) / (rewards.std() + 1e-6)).astype(np.float32)


def draw_prompts(prompts: Sequence[str], count: int, key: Sequence[int], group: int = 1) -> list[str]:
    """`count` prompts drawn uniformly with replacement, reproducibly from an integer `key` (e.g. seed,
    epoch, rank, batch), so a resumed run draws what the interrupted one would have; with `group` > 1,
    `count // group` prompts each repeated `group` times in a row (`count` a multiple of `group`)."""
    if count % group:
        raise ValueError(f"count={count} is not a multiple of group={group}")
    rng = np.random.default_rng([int(k) for k in key])
    return [prompts[i] for i in rng.integers(0, len(prompts), size=count // group) for _ in range(group)]


def best_and_worst(rewards: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Indices of the k highest rewards (best first) and the k lowest (worst first); stable on ties."""
    order = np.argsort(np.asarray(rewards), kind="stable")
    k = min(k, len(order))
    return order[::-1][:k].tolist(), order[:k].tolist()
