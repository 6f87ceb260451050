"""Requests for different LoRAs in one pipeline call: a mixed-adapter batch.

For one call, every LoRA linear layer of the UNet gets the stacked low-rank factors of the call's adapters
(A: adapters x rank x in, B·scale: adapters x out x rank; a smaller rank padded with zeros, adapter 0 all
zeros for "no LoRA") and each batch row's adapter index; with PEFT's own LoRA path switched off, a forward
hook adds `B[row] @ A[row] @ x` to the base layer's output in two batched matmuls. This is PEFT's
mixed-adapter batch (`adapter_names`: the base layer once for the whole batch, each LoRA on its rows)
without its per-adapter Python loop, which costs more than the tiny model's layers (measured: 842 ms for
8 jobs of 8 LoRAs with PEFT's path, against 581 ms for 8 jobs of one LoRA).

A job can join such a call when it uses at most one LoRA, a plain LoRA on linear UNet layers only (the
text encoder encodes all prompts of a call at once, with whatever adapters are set; DoRA, LoHa, LoKr,
LoRA biases and conv LoRAs have other forms); the same LoRA at two weights goes to two calls. Never
imports ray.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch

BASE = ""  # the adapter name of a row without a LoRA


def can_mix(pipe, name: str) -> bool:
    """Whether PEFT adapter `name` can run in a mixed batch: a plain LoRA (or rsLoRA) on linear UNet layers,
    without biases, and nothing of it on another component."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    from diffray.models.adapters import variant_of

    config = getattr(pipe.unet, "peft_config", {}).get(name)
    if config is None or variant_of(config) not in ("lora", "rslora"):
        return False
    if any(name in names for part, names in pipe.get_list_adapters().items() if part != "unet"):
        return False
    layers = [m for m in pipe.unet.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
    return all(isinstance(m, LoraLinear) and m.lora_B[name].bias is None for m in layers)


def assign(slots: list[dict[str, float]], name: str, weight: float) -> int:
    """The index of the first call (`slots`: adapter name -> weight of each call so far) that can take an
    image of LoRA `name` at `weight` without giving that LoRA a second scale; a new call when none can."""
    for k, weights in enumerate(slots):
        if name == BASE or weights.get(name, weight) == weight:
            if name != BASE:
                weights[name] = weight
            return k
    slots.append({} if name == BASE else {name: weight})
    return len(slots) - 1


def _add_rows(module, args, output, *, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor):
    x = args[0]
    idx = rows.repeat(x.shape[0] // rows.numel())  # classifier-free guidance stacks k copies of the batch
    if idx.numel() != x.shape[0]:
        raise RuntimeError(f"a batch of {x.shape[0]} rows for {rows.numel()} mixed-adapter images")
    flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
    delta = torch.bmm(torch.bmm(flat, a[idx].transpose(1, 2)), b[idx].transpose(1, 2))
    return output + delta.reshape(output.shape).to(output.dtype)


class Stacks:
    """The stacked factors of a set of LoRAs at their weights, per LoRA linear layer of a UNet: built once
    per set (the engine keeps the last few while no adapter is loaded or unloaded)."""

    def __init__(self, unet, weights: dict[str, float]):
        from peft.tuners.lora import Linear as LoraLinear

        order = sorted(weights)
        self.index = {n: k + 1 for k, n in enumerate(order)}  # 0: no LoRA
        self.layers: list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for m in unet.modules():
                present = [n for n in order if n in m.lora_A] if isinstance(m, LoraLinear) else []
                if not present:
                    continue
                rank = max(m.r[n] for n in present)
                w = m.lora_A[present[0]].weight
                a = w.new_zeros(len(order) + 1, rank, w.shape[1])
                b = w.new_zeros(len(order) + 1, m.lora_B[present[0]].weight.shape[0], rank)
                for n in present:  # PEFT's LoraLayer.set_scale: weight * alpha / r (rsLoRA: / sqrt(r))
                    scale = weights[n] * m.lora_alpha[n] / (m.r[n] ** 0.5 if m.use_rslora.get(n) else m.r[n])
                    a[self.index[n], : m.r[n]] = m.lora_A[n].weight
                    b[self.index[n], :, : m.r[n]] = m.lora_B[n].weight * scale
                self.layers.append((m, a, b))

    @contextlib.contextmanager
    def rows(self, names: list[str]) -> Iterator[None]:
        """While open, every LoRA linear layer adds to its base output, for each batch row, the LoRA named
        for that row (`names`: one per image, BASE for none). The caller has switched PEFT's own LoRA path
        off (`disable_lora`)."""
        index = torch.tensor([self.index.get(n, 0) for n in names])
        handles = []
        for m, a, b in self.layers:
            rows = index.to(a.device)  # no copy when the layer is on the CPU
            handles.append(m.register_forward_hook(partial(_add_rows, a=a, b=b, rows=rows)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
