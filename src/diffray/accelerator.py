"""The accelerator options as config fields (`train.*` for training, `generator.*` for serving inherit
them); `diffray.models.speed` applies them. Imports neither torch nor ray: configs validate without them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Accelerator(BaseModel):
    """The options as config fields: `train.*` (training) and `generator.*` (serving) inherit them."""

    attention: Literal["sdpa", "eager"] = Field("sdpa", description="UNet/ControlNet attention: torch's fused "
                                                "SDPA, or the plain reference (diffray.models.speed).")
    channels_last: bool = Field(False, description="Channels-last (NHWC) UNet/ControlNet weights (GPU convs).")
    compile: bool = Field(False, description="torch.compile the UNet/ControlNet in place (GPU; the first call of "
                          "each input shape compiles, and so does the first call of each adapter unless serving "
                          "has `generator.hotswap`). Serving then runs each LoRA set in its own call (no "
                          "mixed-adapter batches).")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default", description="torch.compile mode (with compile).")
    compile_backend: Literal["inductor", "aot_eager", "cudagraphs"] = Field(
        "inductor", description="torch.compile backend (with compile): inductor generates kernels; aot_eager "
        "only captures the graphs (a cheap check that a model compiles).")
