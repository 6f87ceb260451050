"""DDPO components: DDIM step log-probabilities, trajectory sampling on the tiny UNet, per-prompt
advantage normalisation and PPO's clipped loss, checked against numbers computed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.distributions import Normal

from diffray.models.tiny import SCHEDULER_CONFIG, preset_configs
from diffray.trainers.components.ddpo import (
    PerPromptStatTracker,
    clipped_policy_loss,
    ddim_scheduler,
    ddim_step_with_logprob,
    guided_noise_pred,
    sample_trajectory,
    step_kl,
    transition_log_prob,
    transition_terms,
)
from diffray.trainers.components.ddpo_steps import train_columns, trained_steps

STEPS = 10


def make_scheduler(**overrides) -> DDIMScheduler:
    s = DDIMScheduler.from_config({**SCHEDULER_CONFIG, **overrides})
    s.set_timesteps(STEPS)
    return s


@pytest.fixture(scope="module")
def unet():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(**preset_configs("tiny-random")["unet"]).eval()


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)


def reference_log_prob(scheduler, eps, t, x, prev, eta):
    """The DDIM transition density written out from the paper (eqs. 12, 16), epsilon prediction."""
    a = scheduler.alphas_cumprod
    t_prev = t - 1000 // STEPS
    a_t = a[t].double()
    a_prev = (a[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod).double()
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps.double()
    return Normal(mean, sigma).log_prob(prev.double()).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_step_log_prob_is_the_gaussian_density_of_the_ddim_step(eta):
    sched = make_scheduler()
    g = torch.Generator().manual_seed(0)
    for t in [int(sched.timesteps[i]) for i in (0, 4, STEPS - 1)]:  # first, middle, last (uses final alpha)
        x, eps, far = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
        near, _ = ddim_step_with_logprob(sched, eps, t, x, eta, generator=g)  # a typical x_{t-1}
        for prev, rtol in ((near, 1e-5), (far, 1e-4)):  # far: log-probs ~ -1e4, at fp32's resolution
            out, log_prob = ddim_step_with_logprob(sched, eps, t, x, eta, prev_sample=prev)
            assert torch.equal(out, prev) and log_prob.shape == (3,)
            torch.testing.assert_close(log_prob.double(), reference_log_prob(sched, eps, t, x, prev, eta),
                                       rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_sampled_step_equals_diffusers_ddim_step_with_the_same_noise(prediction_type):
    sched = make_scheduler(prediction_type=prediction_type)
    t = int(sched.timesteps[3])
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ours, log_prob = ddim_step_with_logprob(sched, out, t, x, 0.7, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    theirs = sched.step(out, t, x, eta=0.7, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # scoring the sample it drew gives the same log-probability
    torch.testing.assert_close(ddim_step_with_logprob(sched, out, t, x, 0.7, prev_sample=ours)[1], log_prob)


def test_batched_timesteps_equal_per_sample_steps():
    sched = make_scheduler()
    x, eps, prev = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    ts = sched.timesteps[[0, 5, 9]]
    batched = ddim_step_with_logprob(sched, eps, ts, x, 1.0, prev_sample=prev)[1]
    single = torch.cat([ddim_step_with_logprob(sched, eps[one], ts[i], x[one], 1.0, prev_sample=prev[one])[1]
                        for i in range(3) for one in [slice(i, i + 1)]])
    torch.testing.assert_close(batched, single)


def test_step_rejects_what_has_no_log_prob():
    sched = make_scheduler()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim_step_with_logprob(sched, x, 1, x, 0.0)
    with pytest.raises(ValueError, match="not both"):
        ddim_step_with_logprob(sched, x, 1, x, 1.0, prev_sample=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="zero variance"):
        ddim_step_with_logprob(make_scheduler(set_alpha_to_one=True), x, 1, x, 1.0, prev_sample=x)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(DDIMScheduler.from_config(SCHEDULER_CONFIG), x, 1, x, 1.0, prev_sample=x)


def test_log_prob_gradient_reaches_the_model_output():
    sched = make_scheduler()
    eps = torch.randn(2, 4, 8, 8, requires_grad=True)
    x, prev = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ddim_step_with_logprob(sched, eps, int(sched.timesteps[2]), x, 1.0, prev_sample=prev)[1].sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0


def sample(unet, embeds, seed=0, guidance=5.0, eta=1.0, steps=4):
    prompt, negative = embeds
    return sample_trajectory(unet, make_scheduler(), prompt, negative, steps, guidance, eta,
                             torch.Generator().manual_seed(seed))


def test_trajectory_is_deterministic_and_its_log_probs_are_recomputable(unet, embeds):
    a, b = sample(unet, embeds), sample(unet, embeds)
    for name in ("latents", "timesteps", "log_probs"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(sample(unet, embeds, seed=1).latents, a.latents)
    # what the PPO update does: score the stored transitions with unchanged weights -> ratio 1
    sched, (prompt, negative) = make_scheduler(), embeds
    sched.set_timesteps(4)
    with torch.no_grad():
        for j, t in enumerate(a.timesteps):
            lp = transition_log_prob(unet, sched, a.states[:, j], a.next_latents[:, j], t, prompt, negative, 5.0, 1.0)
            torch.testing.assert_close(lp, a.log_probs[:, j], rtol=1e-5, atol=1e-5)
        # DDPO shuffles time per sample: sample 0 at step 3, sample 1 at step 0 in one batch
        js = torch.tensor([3, 0])
        lp = transition_log_prob(unet, sched, a.states[[0, 1], js], a.next_latents[[0, 1], js], a.timesteps[js],
                                 prompt, negative, 5.0, 1.0)
        torch.testing.assert_close(lp, a.log_probs[[0, 1], js], rtol=1e-5, atol=1e-5)


def test_trajectory_shapes_and_timesteps(unet, embeds):
    traj = sample(unet, embeds, eta=0.5, steps=5)
    assert traj.latents.shape == (2, 6, 4, 8, 8) and traj.latents.dtype == torch.float32
    assert traj.log_probs.shape == (2, 5) and torch.isfinite(traj.log_probs).all()
    assert traj.timesteps.tolist() == [801, 601, 401, 201, 1]  # leading spacing, steps_offset=1
    assert traj.states.shape == traj.next_latents.shape == (2, 5, 4, 8, 8)
    assert torch.equal(traj.final_latents, traj.latents[:, -1])
    assert torch.equal(traj.states[:, 1:], traj.next_latents[:, :-1])


def test_guidance_with_negative_equal_to_prompt_is_no_guidance(unet, embeds):
    prompt, _ = embeds
    g = sample(unet, (prompt, prompt), guidance=7.0)
    plain = sample(unet, (prompt, None), guidance=7.0)
    torch.testing.assert_close(g.latents, plain.latents, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(sample(unet, embeds, guidance=7.0).latents, plain.latents)


def test_sdxl_guidance_pairs_each_half_with_its_own_added_conditioning_and_log_probs_recompute(tmp_path):
    """SDXL's conditioning is a dict (states, pooled embedding, size ids): guidance concatenates every part,
    the negative's pooled embedding with the negative's states, and PPO's recomputation gives ratio 1."""
    from diffray.models import build_pipeline_dir
    from diffray.models.family import StableDiffusionXL
    from diffray.trainers.components.ddpo import guided_noise_pred, index_conditioning

    family = StableDiffusionXL()
    comps = family.load(str(build_pipeline_dir(tmp_path / "xl", "tiny-sdxl", seed=0)))
    unet = comps.unet.eval()

    def cond(prompts):
        with torch.no_grad():
            return family.conditioning(comps, family.tokenize(comps, prompts), {}, (64, 64))

    prompt, negative = cond(["a red circle", "a blue square"]), cond(["blurry"])
    assert prompt["added_cond_kwargs"]["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([801, 401])
    with torch.no_grad():
        guided = guided_noise_pred(unet, x, t, prompt, negative, 5.0)
        pooled = negative["added_cond_kwargs"]["text_embeds"].expand(2, -1)
        uncond = unet(x, t, encoder_hidden_states=negative["encoder_hidden_states"].expand(2, -1, -1),
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": prompt["added_cond_kwargs"]["time_ids"]})
        text = unet(x, t, **prompt)
    torch.testing.assert_close(guided, uncond.sample + 5.0 * (text.sample - uncond.sample), rtol=1e-4, atol=1e-5)

    with torch.no_grad():
        traj = sample_trajectory(unet, make_scheduler(), prompt, negative, 3, 5.0, 1.0,
                                 torch.Generator().manual_seed(0))
        sched = make_scheduler()
        sched.set_timesteps(3)
        js = torch.tensor([2, 0])  # per-sample steps, one row of the conditioning each
        rows = torch.tensor([1, 0])
        lp = transition_log_prob(unet, sched, traj.states[rows, js], traj.next_latents[rows, js], traj.timesteps[js],
                                 index_conditioning(prompt, rows), negative, 5.0, 1.0)
    torch.testing.assert_close(lp, traj.log_probs[rows, js], rtol=1e-5, atol=1e-5)


def test_stat_tracker_normalises_per_prompt_then_falls_back_to_the_batch():
    t = PerPromptStatTracker(buffer_size=2, min_count=2)
    adv = t.update(["a", "b", "a", "b"], np.array([1.0, 10.0, 3.0, 14.0]))
    np.testing.assert_allclose(adv, [-1, -1, 1, 1], atol=1e-5)  # a: mean 2 std 1; b: mean 12 std 2
    assert adv.dtype == np.float32
    adv = t.update(["a"], np.array([5.0]))  # buffer of 2 keeps [3, 5]: mean 4, std 1
    np.testing.assert_allclose(adv, [1.0], atol=1e-5)
    assert t.stats()["a"] == {"mean": 4.0, "std": 1.0, "count": 2}
    cold = PerPromptStatTracker(buffer_size=16, min_count=3)  # too few per prompt: batch statistics
    r = np.array([1.0, 10.0, 3.0, 14.0])
    np.testing.assert_allclose(cold.update(["a", "b", "a", "b"], r), (r - 7.0) / (r.std() + 1e-6), rtol=1e-6)


def test_clipped_loss_on_hand_computed_numbers():
    ratio = torch.tensor([1.5, 0.5, 1.0, 1.1])
    old = torch.tensor([-1.0, -2.0, 0.5, 3.0])
    new = (old + ratio.log()).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, 10.0])  # 10 is clamped to 5
    loss, kl, clip_frac = clipped_policy_loss(new, old, adv, clip_range=0.2, adv_clip_max=5.0)
    # max(-A r, -A clip(r)): [max(-1.5,-1.2), max(-0.5,-0.8), 1, max(-5.5,-5.5)]
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.0 - 5.5) / 4, abs=1e-5)
    assert clip_frac.item() == 0.5
    assert kl.item() == pytest.approx(0.5 * float((ratio.log() ** 2).mean()), rel=1e-5)
    loss.backward()  # the clipped sample (r=1.5, A>0) gets no gradient; the others -A r / B
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -0.5, 1.0, -5.5]) / 4)


def test_clipped_loss_at_ratio_one_is_the_plain_policy_gradient_loss():
    lp = torch.tensor([-0.3, 0.2, 1.0])
    adv = torch.tensor([0.5, -2.0, 1.5])
    loss, kl, clip_frac = clipped_policy_loss(lp, lp.clone(), adv, clip_range=1e-4, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(float(-adv.mean())) and kl.item() == 0 and clip_frac.item() == 0


def test_step_kl_is_the_hand_computed_gaussian_kl_of_the_two_means():
    sched = make_scheduler()
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    offset = torch.tensor([0.0, 0.3]).reshape(2, 1, 1, 1)
    t = int(sched.timesteps[4])
    kl = step_kl(sched, eps + offset, eps, t, x, 1.0)
    # epsilon prediction: mean = sqrt(a_prev) (x - sqrt(1 - a_t) eps) / sqrt(a_t) + sqrt(1 - a_prev - s^2) eps, so a
    # shift d of eps shifts every element of the mean by k d; both steps have the same sigma s
    a = sched.alphas_cumprod.double()
    a_t, a_prev = a[t], a[t - 1000 // STEPS]
    sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    k = -a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt() + (1 - a_prev - sigma**2).sqrt()
    assert kl[0].item() == 0.0
    assert kl[1].item() == pytest.approx(float((k * 0.3) ** 2 / (2 * sigma**2)), rel=1e-4)


def test_kl_to_the_adapters_off_reference_is_zero_there_and_its_gradient_pulls_the_lora_back(embeds):
    from diffray.models.adapters import add_lora
    from diffray.trainers.ddpo.task import ReferenceUNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**preset_configs("tiny-random")["unet"]).eval()
    add_lora(unet, 4, 4, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], seed=0)
    sched, (prompt, negative) = make_scheduler(), embeds
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    nxt = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    t, reference = sched.timesteps[3], ReferenceUNet(unet)
    lp, kl = transition_terms(unet, sched, x, nxt, t, prompt, negative, 5.0, 1.0, reference)
    assert torch.equal(lp, transition_log_prob(unet, sched, x, nxt, t, prompt, negative, 5.0, 1.0))
    assert kl.abs().max().item() < 1e-10  # a fresh LoRA (B = 0) is the base model
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    lp, kl = transition_terms(unet, sched, x, nxt, t, prompt, negative, 5.0, 1.0, reference)
    assert kl.min().item() > 0
    # the two terms from one step mean are the step's log-probability and KL computed each on its own
    with torch.no_grad():
        pred = guided_noise_pred(unet, x, t, prompt, negative, 5.0)
        ref = guided_noise_pred(reference, x, t, prompt, negative, 5.0)
    assert torch.equal(lp.detach(), ddim_step_with_logprob(sched, pred, t, x, 1.0, prev_sample=nxt)[1])
    assert torch.equal(kl.detach(), step_kl(sched, pred, ref, t, x, 1.0))
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    assert all(p.requires_grad for p in lora)
    kl.mean().backward()
    with torch.no_grad():
        for p in lora:
            p -= 0.5 * p.grad
    _, after = transition_terms(unet, sched, x, nxt, t, prompt, negative, 5.0, 1.0, reference)
    assert after.mean().item() < 0.8 * kl.mean().item()  # a step down the KL's gradient: closer to the base
    assert all(p.requires_grad for p in lora)  # the reference pass switched the adapters back on


@pytest.mark.parametrize("spacing, first, last", [("leading", (0.03, 0.05), (0.015, 0.025)),
                                                  ("trailing", (0.8, 0.9), (0.02, 0.04))])
def test_step_stds_are_diffusers_ddim_variances_and_tiny_ones_are_not_trained(spacing, first, last):
    from diffusers import DDPMScheduler

    s = ddim_scheduler(DDPMScheduler.from_config(SCHEDULER_CONFIG), spacing)
    assert s.config.timestep_spacing == spacing
    kept, stds = trained_steps(s, 2, 1.0, 0.1)
    expected = [float(s._get_variance(int(t), int(t) - 500)) ** 0.5 for t in s.timesteps]
    np.testing.assert_allclose(stds, expected, rtol=1e-5)
    assert first[0] < stds[0] < first[1] and last[0] < stds[1] < last[1]
    assert kept == ([0] if spacing == "trailing" else [])
    assert trained_steps(s, 2, 1.0, 0.0)[0] == [0, 1]
    assert trained_steps(s, 2, 0.5, 0.0)[1] == pytest.approx([v / 2 for v in stds])


def test_train_columns_draw_only_kept_steps_and_all_steps_as_before():
    g = torch.Generator().manual_seed(3)
    cols = train_columns(torch.tensor([0, 2, 5]), 2, 64, g)
    assert cols.shape == (64, 2) and set(cols.flatten().tolist()) == {0, 2, 5}
    assert all(row[0] != row[1] for row in cols.tolist())
    every = train_columns(torch.arange(6), 3, 8, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)  # every step kept: the draws DDPO made before steps could be dropped
    torch.testing.assert_close(every, torch.stack([torch.randperm(6, generator=g) for _ in range(8)])[:, :3])
