"""Pure training components: per-sample noise, targets, min-SNR loss, DeepSpeed config."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffray.trainers.components.diffusion import (
    diffusion_target,
    per_sample_loss,
    sample_noise_and_timesteps,
)
from diffray.trainers.components.zero import build_deepspeed_config


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_noise_depends_on_sample_not_batch():
    n_ab, t_ab = sample_noise_and_timesteps((4, 8, 8), [3, 9], step=5, seed=0, num_train_timesteps=1000)
    n_b, t_b = sample_noise_and_timesteps((4, 8, 8), [9], step=5, seed=0, num_train_timesteps=1000)
    assert torch.equal(n_ab[1], n_b[0]) and t_ab[1] == t_b[0]
    n_next, _ = sample_noise_and_timesteps((4, 8, 8), [9], step=6, seed=0, num_train_timesteps=1000)
    assert not torch.equal(n_next[0], n_b[0])
    n_seed, _ = sample_noise_and_timesteps((4, 8, 8), [9], step=5, seed=1, num_train_timesteps=1000)
    assert not torch.equal(n_seed[0], n_b[0])
    assert n_ab.shape == (2, 4, 8, 8) and t_ab.dtype == torch.long and (0 <= t_ab).all() and (t_ab < 1000).all()


def test_timestep_range_draws_only_from_it_with_the_same_noise():
    ids = list(range(256))
    full_n, full_t = sample_noise_and_timesteps((4, 8, 8), ids, 1, 0, 1000)
    high_n, high_t = sample_noise_and_timesteps((4, 8, 8), ids, 1, 0, 1000, timestep_range=(500, 1000))
    assert (high_t >= 500).all() and (high_t < 1000).all() and high_t.float().mean() > 700
    assert (full_t < 500).sum() > 64  # the default draws from the whole schedule
    assert torch.equal(high_n, full_n)  # the same noise per sample: only the timestep's draw changes
    again_n, again_t = sample_noise_and_timesteps((4, 8, 8), ids, 1, 0, 1000, timestep_range=(500, 1000))
    assert torch.equal(again_t, high_t)
    with pytest.raises(ValueError, match=r"\[900, 100\)"):
        sample_noise_and_timesteps((4, 8, 8), ids, 1, 0, 1000, timestep_range=(900, 100))


def test_offset_noise_shifts_channel_means():
    plain, _ = sample_noise_and_timesteps((4, 32, 32), list(range(64)), 1, 0, 1000)
    offset, _ = sample_noise_and_timesteps((4, 32, 32), list(range(64)), 1, 0, 1000, noise_offset=0.5)
    spread = lambda n: n.mean(dim=(2, 3)).std().item()  # noqa: E731
    assert spread(offset) > 3 * spread(plain)


def test_targets(scheduler):
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(diffusion_target(scheduler, latents, noise, t, "epsilon"), noise)
    v = diffusion_target(scheduler, latents, noise, t, "v_prediction")
    a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(v, a * noise - s * latents)
    with pytest.raises(ValueError, match="allowed: epsilon, v_prediction"):
        diffusion_target(scheduler, latents, noise, t, "sample")


def test_min_snr_weighting(scheduler):
    pred, target = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    t = torch.tensor([5, 990])  # very high SNR, very low SNR
    plain = per_sample_loss(pred, target, t, scheduler, "epsilon")
    torch.testing.assert_close(plain, torch.ones(2))
    weighted = per_sample_loss(pred, target, t, scheduler, "epsilon", snr_gamma=5.0)
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    torch.testing.assert_close(weighted, torch.clamp(snr, max=5.0) / snr)
    assert weighted[0] < 0.1 and weighted[1] == pytest.approx(1.0)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config(stage):
    c = build_deepspeed_config(stage, micro_batch_size=2, grad_accum_steps=3, world_size=2, max_grad_norm=1.0)
    assert c["train_batch_size"] == 12 and c["zero_optimization"]["stage"] == stage
    assert c["gradient_clipping"] == 1.0 and "fp16" not in c and "bf16" not in c
    off = build_deepspeed_config(3, 1, 1, 1, None, "bf16", offload_optimizer=True, offload_params=True)
    assert off["bf16"]["enabled"] and off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "gradient_clipping" not in off
    with pytest.raises(ValueError, match="precision"):
        build_deepspeed_config(2, 1, 1, 1, None, "fp8")


def test_zero2_keeps_an_adapters_gradients_in_place_and_a_large_sets_contiguous():
    """An adapter's small gradients skip the per-tensor copy into contiguous buckets (most of ZeRO-2's step
    cost for a LoRA); a large trainable set, an unknown size, an offloaded optimizer and ZeRO-3 keep them."""
    def layout(stage=2, **kw):
        z = build_deepspeed_config(stage, 1, 1, 2, 1.0, **kw)["zero_optimization"]
        return z["contiguous_gradients"], z["reduce_scatter"]

    assert layout(trainable_elements=800_000) == (False, False)
    assert layout(trainable_elements=860_000_000) == (True, True)
    assert layout() == (True, True)
    assert layout(trainable_elements=800_000, offload_optimizer=True) == (True, True)
    assert layout(3, trainable_elements=800_000) == (True, True)


def test_caption_dropout_is_keyed_per_sample_and_hits_its_rate():
    from diffray.trainers.components.diffusion import caption_dropout_mask

    ids = list(range(4000))
    mask = caption_dropout_mask(ids, step=3, seed=0, p=0.25)
    assert abs(mask.float().mean().item() - 0.25) < 0.03
    assert torch.equal(caption_dropout_mask(ids[10:20], 3, 0, 0.25), mask[10:20]), "independent of the batch"
    assert not torch.equal(caption_dropout_mask(ids, 4, 0, 0.25), mask), "redrawn every step"
    assert not caption_dropout_mask(ids, 3, 0, 0.0).any() and caption_dropout_mask(ids, 3, 0, 1.0).all()
