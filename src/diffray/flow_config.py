"""The `flow:` config section: how flow-matching families (Flux) draw training timesteps and what guidance
value a guidance-distilled transformer trains with. Plain pydantic (no torch, no Ray), like `diffray.config`.
Families that train by DDPM refuse any non-default value here (`diffray.models.family`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FlowSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = Field(
        "uniform", description="Density of the training timesteps (SD3/Flux recipes): uniform over the scheduler's "
        "sigmas, logit-normal (sigmoid of N(logit_mean, logit_std)) or mode (mode_scale).")
    logit_mean: float = Field(0.0, description="logit_normal: mean of the normal.")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: standard deviation of the normal.")
    mode_scale: float = Field(1.29, description="mode: the density's scale.")
    shift: float | None = Field(None, gt=0, description="Timestep shift: sigma -> shift*s / (1 + (shift-1)*s) "
                                "(3.0 is Flux-dev's, 1.0 none); null = the scheduler's sigmas as shipped.")
    guidance: float = Field(3.5, ge=0, description="The guidance value a guidance-distilled transformer (FLUX.1-dev: "
                            "guidance_embeds) is fed in training; render at the same value.")

    def is_default(self) -> bool:
        return self == FlowSection()
