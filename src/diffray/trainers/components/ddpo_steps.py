"""Which of DDPO's sampling steps are trained. Each DDIM step is a Gaussian policy with std sigma_t, and a step's
log-probability gradient scales as 1 / sigma_t: a step with a tiny sigma_t explores nothing and its gradient is
mostly that step's own noise. The last step's sigma_t is about 0.03 at any step count; at few steps with SD's
"leading" spacing every step's is tiny (0.04 and 0.02 at 2 steps), while "trailing" starts from full noise
(0.85 at the first of 2). Never imports ray or deepspeed.
"""

from __future__ import annotations

import logging

import torch

from diffray.trainers.components.ddpo import step_std

log = logging.getLogger(__name__)


def trained_steps(scheduler, steps: int, eta: float, min_std: float) -> tuple[list[int], list[float]]:
    """(indices of the `steps` sampling steps whose sigma_t is at least `min_std`, every step's sigma_t). A step
    with a tiny sigma_t explores nothing: its log-probability's gradient scales as 1 / sigma_t and is mostly the
    noise of that step, not the reward's signal (the last step's sigma_t is about 0.03 at any step count)."""
    scheduler.set_timesteps(steps)
    stds = [float(s) for s in step_std(scheduler, scheduler.timesteps, eta)]
    return [i for i, s in enumerate(stds) if s >= min_std], stds


def train_columns(trained: torch.Tensor, count: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """[samples, count] step indices to train, each row `count` distinct draws from `trained` (the indices
    `trained_steps` kept), random per sample from `generator`."""
    return trained[torch.stack([torch.randperm(len(trained), generator=generator) for _ in range(samples)])[:, :count]]


def sampled_steps(d, scheduler) -> list[int]:
    """The indices of the sampling steps a `ddpo` config section `d` trains (`trained_steps` under its
    `min_step_std`), from the DDIM `scheduler` it samples with (`ddim_scheduler` of the model's under
    `d.timestep_spacing`; its timesteps are set to `d.sample_steps`); a ConfigError naming `ddpo.min_step_std`
    when none is left. Logs a warning when every step's sigma_t is below 0.1: the policy can barely explore."""
    from diffray.errors import ConfigError

    kept, stds = trained_steps(scheduler, d.sample_steps, d.eta, d.min_step_std)
    shown = ", ".join(f"{s:.3f}" for s in stds)
    if not kept:
        raise ConfigError(f"no sampling step has sigma_t >= {d.min_step_std:g} (sample_steps={d.sample_steps}, "
                          f"{scheduler.config.timestep_spacing!r} spacing: {shown})", field="ddpo.min_step_std")
    if max(stds) < 0.1:
        log.warning("ddpo: every sampling step's sigma_t is below 0.1 (%s; sample_steps=%d, %r spacing): the "
                    "policy can barely explore and DDPO will learn little. Set ddpo.timestep_spacing=trailing or "
                    "more ddpo.sample_steps", shown, d.sample_steps, scheduler.config.timestep_spacing)
    return kept
