"""An exponential moving average (EMA) of trained weights, with diffusers' warmup.

The k-th update (k = optimizer steps so far, this one included) mixes in the live weights with decay
0 for k = 1 and min(decay, k / (k + 9)) after, i.e. `diffusers.training_utils.EMAModel`'s formula
(`min(decay, (1 + n) / (10 + n))` with n = k - 1 steps before this one; `decay_at`). Our own small
class rather than `EMAModel`, because the average may live on another device than the weights
(`on_cpu`) and is keyed by parameter name (checkpointed as safetensors, swapped in for validation and
export). Pure torch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def decay_at(decay: float, k: int) -> float:
    """The decay of the k-th update (1-based), as diffusers' EMAModel (no `update_after_step`)."""
    n = k - 1
    return 0.0 if n <= 0 else min(decay, (1 + n) / (10 + n))


class Ema:
    """fp32 shadow copies of named parameters, updated after each optimizer step."""

    def __init__(self, named: dict[str, torch.Tensor], decay: float, on_cpu: bool = False):
        self.decay, self.on_cpu, self.steps = decay, on_cpu, 0
        self.shadow = {n: p.detach().to("cpu" if on_cpu else p.device, torch.float32, copy=True)
                       for n, p in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.Tensor]) -> None:
        """One EMA step toward the live weights: shadow = d * shadow + (1 - d) * weight."""
        self.steps += 1
        weight = 1.0 - decay_at(self.decay, self.steps)
        for n, s in self.shadow.items():
            s.lerp_(named[n].detach().to(s.device, torch.float32), weight)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(tensors, metadata) for a safetensors file: the shadow weights and the step count."""
        return ({n: s.detach().cpu().contiguous() for n, s in self.shadow.items()},
                {"steps": str(self.steps), "decay": repr(self.decay)})

    def load_state_dict(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for n, s in self.shadow.items():
            s.copy_(tensors[n])
        self.steps = int(metadata["steps"])

    @contextmanager
    @torch.no_grad()
    def swapped(self, named: dict[str, torch.Tensor]) -> Iterator[None]:
        """The EMA weights in the live parameters inside the block; the trained ones restored after."""
        saved = {n: p.detach().clone() for n, p in named.items()}
        try:
            for n, p in named.items():
                p.copy_(self.shadow[n].to(p.device, p.dtype))
            yield
        finally:
            for n, p in named.items():
                p.copy_(saved[n])
