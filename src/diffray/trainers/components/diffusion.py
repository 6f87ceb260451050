"""Noise, timesteps, targets and losses for epsilon / v-prediction diffusion training.

Randomness is keyed by (seed, step, sample_id) rather than drawn from a global generator, so the
noise a sample gets does not depend on which worker sees it, on the micro-batch size, or on whether
the run was resumed: data-parallel layouts and restarts reproduce the same training signal.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def sample_generator(seed: int, step: int, sample_id: int) -> torch.Generator:
    """A CPU generator unique to (seed, step, sample_id)."""
    # Large odd multipliers keep the three keys from colliding for any realistic run.
    key = (seed * 1_000_003 + step) * 2_147_483_647 + sample_id
    return torch.Generator().manual_seed(key % (2**63 - 1))


def sample_noise_and_timesteps(
    latent_shape: tuple[int, ...],
    sample_ids: list[int],
    step: int,
    seed: int,
    num_train_timesteps: int,
    noise_offset: float = 0.0,
    timestep_range: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise [B, C, H, W] and integer timesteps [B], deterministic per sample.

    Args:
        latent_shape: shape of ONE latent (C, H, W).
        noise_offset: offset-noise strength: adds a per-channel constant so the model can learn
            very dark/bright images.
        timestep_range: draw timesteps uniformly from [lo, hi) instead of [0, num_train_timesteps).
    """
    lo, hi = timestep_range or (0, num_train_timesteps)
    if not 0 <= lo < hi <= num_train_timesteps:
        raise ValueError(f"timestep range [{lo}, {hi}) is not within the schedule's [0, {num_train_timesteps})")
    noises, timesteps = [], []
    c = latent_shape[0]
    for sid in sample_ids:
        g = sample_generator(seed, step, int(sid))
        n = torch.randn(latent_shape, generator=g)
        if noise_offset:
            n = n + noise_offset * torch.randn((c, 1, 1), generator=g)
        noises.append(n)
        timesteps.append(torch.randint(lo, hi, (1,), generator=g))
    return torch.stack(noises), torch.cat(timesteps).long()


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                     prediction_type: str) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction_type {prediction_type!r} (allowed: epsilon, v_prediction)")


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                    prediction_type: str, snr_gamma: float | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE per sample [B], optionally Min-SNR weighted (Hang et al., 2023) and masked (`masked_mse`)."""
    if mask is None:
        mse = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    else:
        mse = masked_mse(pred, target, mask)
    if snr_gamma is None:
        return mse
    snr = compute_snr(scheduler, timesteps).to(mse.device)
    weight = torch.clamp(snr, max=snr_gamma)
    weight = weight / snr if prediction_type == "epsilon" else weight / (snr + 1)
    return mse * weight


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel-resolution loss mask [B, 1, H, W] in [0, 1] averaged down to the latent grid `size` (h, w):
    each latent cell is weighted by the fraction of its pixels the mask covers."""
    return F.adaptive_avg_pool2d(mask.float(), size) if tuple(mask.shape[-2:]) != tuple(size) else mask.float()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE [B] over the masked elements only: sum(m * (pred - target)^2) / sum(m) over every
    channel, `mask` [B, 1, H, W] at pixel or latent resolution. A row whose mask is empty has loss 0 and
    no gradient (never 0/0 = NaN); unmasked elements get exactly zero gradient."""
    m = latent_mask(mask.to(pred.device), tuple(pred.shape[-2:])).expand_as(pred)
    err = F.mse_loss(pred.float(), target.float(), reduction="none") * m
    dims = tuple(range(1, pred.ndim))
    return err.sum(dim=dims) / m.sum(dim=dims).clamp_min(1e-8)


def batch_mean(losses: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The mean of per-sample losses over the rows that train: with loss masks, rows whose mask is empty
    are left out (they change nothing, not even the divisor); 0 (with a graph) when no row trains."""
    if mask is None:
        return losses.mean()
    live = (mask.flatten(1).sum(dim=1) > 0).to(losses.device, losses.dtype)
    return (losses * live).sum() / live.sum().clamp_min(1.0)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, sample_ids: list[int], step: int, seed: int,
                   scaling_factor: float) -> torch.Tensor:
    """A draw from the VAE posterior N(mean, std^2), scaled; the draw keyed by (seed, step, sample_id)."""
    eps = torch.stack([torch.randn(mean.shape[1:], generator=sample_generator(seed + 7919, step, int(s)))
                       for s in sample_ids]).to(mean.device, mean.dtype)
    return (mean + std * eps) * scaling_factor


def encode_latents(vae, pixel_values: torch.Tensor, sample_ids: list[int], step: int, seed: int) -> torch.Tensor:
    """VAE latents (sampled from the posterior, scaled), the sample drawn per (seed, step, sample_id)."""
    dist = vae.encode(pixel_values).latent_dist
    return sample_latents(dist.mean, dist.std, sample_ids, step, seed, vae.config.scaling_factor)


def caption_dropout_mask(sample_ids: list[int], step: int, seed: int, p: float) -> torch.Tensor:
    """Bool [B]: which samples train with the empty caption this step (probability p, keyed per sample)."""
    if p <= 0:
        return torch.zeros(len(sample_ids), dtype=torch.bool)
    return torch.tensor([bool(torch.rand((), generator=sample_generator(seed + 15_485_863, step, int(s))) < p)
                         for s in sample_ids])


@torch.no_grad()
def batch_latents(vae, batch: dict, device, dtype, step: int, seed: int) -> torch.Tensor:
    """The batch's scaled VAE latents (fp32), drawn per (seed, step, sample_id) from the latent cache's
    posterior (`latent_mean`/`latent_std`: no VAE work) or from encoding `pixel_values`: the same draw
    for the same sample either way."""
    ids = [int(i) for i in batch["sample_id"]]
    if "latent_mean" in batch:
        mean, std = (batch[k].to(device, torch.float32) for k in ("latent_mean", "latent_std"))
        return sample_latents(mean, std, ids, step, seed, vae.config.scaling_factor)
    return encode_latents(vae, batch["pixel_values"].to(device, dtype), ids, step, seed).float()


class NoisedLatents(NamedTuple):
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy: torch.Tensor


def noise_latents(vae, scheduler, batch: dict, device, dtype, step: int, seed: int,
                  noise_offset: float = 0.0, timestep_range: tuple[int, int] | None = None) -> NoisedLatents:
    """The batch's latents (fp32, no grad) and the noise, timesteps and noisy latents of one training
    step, every draw keyed by (seed, step, sample_id).

    The latents come from the latent cache (`latent_mean`/`latent_std` columns: no VAE work) or from
    encoding `pixel_values` with the VAE; both give the same draw for the same sample.
    """
    ids = [int(i) for i in batch["sample_id"]]
    latents = batch_latents(vae, batch, device, dtype, step, seed)
    noise, timesteps = sample_noise_and_timesteps(tuple(latents.shape[1:]), ids, step, seed,
                                                  scheduler.config.num_train_timesteps, noise_offset, timestep_range)
    noise, timesteps = noise.to(latents.device), timesteps.to(latents.device)
    return NoisedLatents(latents, noise, timesteps, scheduler.add_noise(latents, noise, timesteps))
