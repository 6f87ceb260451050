"""The Diffusion-DPO objective (Wallace et al., 2023, eq. 14): pure tensor math, no model.

Each pair's preferred (w) and rejected (l) image is noised with the same noise at the same timestep;
the policy's and the frozen reference's denoising errors give

    inside = -beta / 2 * ((mse_w - mse_l) - (ref_mse_w - ref_mse_l))
    loss   = -log sigmoid(inside)

so the loss falls as the policy denoises the preferred image better than the reference does, relative
to the rejected one. `beta` is the KL weight (the reference implementation's `beta_dpo`; its default is
5000). The reference's denoising error uses the same per-sample MSE as the policy's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DpoTerms(NamedTuple):
    loss: torch.Tensor  # the mean loss of the pairs (scalar, with the policy's graph)
    inside: torch.Tensor  # [B] beta-scaled implicit reward margin of each pair (detached)
    model_diff: torch.Tensor  # [B] mse_w - mse_l of the policy (detached)
    ref_diff: torch.Tensor  # [B] the same of the reference


def diffusion_dpo_loss(model_losses: torch.Tensor, ref_losses: torch.Tensor, beta: float) -> DpoTerms:
    """The DPO loss of B pairs from per-sample denoising losses [2B]: the B preferred rows, then the B
    rejected ones (same order, same noise and timestep per pair), of the policy and of the reference."""
    if model_losses.shape != ref_losses.shape or model_losses.ndim != 1 or len(model_losses) % 2:
        raise ValueError(f"expected two [2B] loss vectors, got {tuple(model_losses.shape)} and "
                         f"{tuple(ref_losses.shape)}")
    model_w, model_l = model_losses.float().chunk(2)
    ref_w, ref_l = ref_losses.detach().float().chunk(2)
    model_diff, ref_diff = model_w - model_l, ref_w - ref_l
    inside = -0.5 * beta * (model_diff - ref_diff)
    return DpoTerms(-F.logsigmoid(inside).mean(), inside.detach(), model_diff.detach(), ref_diff)
