"""Accelerator options on a denoiser (UNet, ControlNet), shared by training and serving: the attention
kernel, the channels-last memory layout and `torch.compile`. Each leaves the model's outputs as they were
(within float noise) and its parameter names untouched, so checkpoints, exports and adapters are the
same with or without them. Never imports ray.

- `attention`: "sdpa" is torch's fused `scaled_dot_product_attention` (diffusers' `AttnProcessor2_0`,
  flash or memory-efficient kernels on GPUs), "eager" the plain matmul-softmax-matmul (`AttnProcessor`),
  a reference when a fused kernel is suspected.
- `channels_last`: NHWC weights, which cuDNN's convolutions prefer on tensor-core GPUs.
- `compile`: `nn.Module.compile` in place (the module keeps its class and state-dict keys). The first
  call at each new input shape, and after adapters are added or removed, compiles again.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from diffray.accelerator import Accelerator


def set_attention(model: torch.nn.Module, kind: str) -> None:
    """Give every attention layer of a diffusers model the processor of `kind` (see the module doc)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if type(model).__name__ == "FluxTransformer2DModel":  # its own processor, on torch's SDPA (no eager one)
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        if kind != "sdpa":
            raise ValueError(f"attention {kind!r}: a Flux transformer has the sdpa kernel only")
        model.set_attn_processor(FluxAttnProcessor())
        return
    model.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def apply(model: torch.nn.Module, opts: Accelerator) -> torch.nn.Module:
    """Apply `opts` to one diffusers model (a UNet or ControlNet) in place; returns it."""
    if hasattr(model, "set_attn_processor"):
        set_attention(model, opts.attention)
    if opts.channels_last:
        model.to(memory_format=torch.channels_last)
    if opts.compile:
        model.compile(backend=opts.compile_backend, mode=None if opts.compile_mode == "default" else opts.compile_mode)
    return model


def denoisers(module: torch.nn.Module) -> Iterable[torch.nn.Module]:
    """The direct children of a training module that are denoisers (have attention processors)."""
    return [m for m in module.children() if hasattr(m, "set_attn_processor")]


def apply_to_children(module: torch.nn.Module, opts: Accelerator) -> torch.nn.Module:
    """`apply` to each denoiser child of `module` (the UNet of a `Denoiser`, the ControlNet and UNet of a
    `ControlledUNet`)."""
    for child in denoisers(module):
        apply(child, opts)
    return module
