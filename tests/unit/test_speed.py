"""The accelerator options (`diffray.models.speed`, `optim.fused`) leave outputs and updates as they were:
eager vs SDPA attention, channels-last and torch.compile (the aot_eager backend: the same graph capture
and autograd tracing as inductor, without generating kernels, which on CPU takes minutes) on a UNet with a
LoRA, fused vs looped AdamW, and a serving engine with every option against a plain one."""

from __future__ import annotations

import pytest
import torch

from diffray.config import OptimSection
from diffray.errors import ConfigError
from diffray.methods import load_config
from diffray.models import speed
from diffray.models.adapters import add_lora
from diffray.models.tiny import build_components
from diffray.trainers.engine import build_optimizer
from testkit.models import TINY_RANDOM

CASES = {"eager attention": {"attention": "eager"}, "channels-last": {"channels_last": True},
         "compiled": {"compile": True, "compile_backend": "aot_eager"},
         "all": {"attention": "eager", "channels_last": True, "compile": True, "compile_backend": "aot_eager"}}


def lora_unet():
    unet = build_components("tiny-random")["unet"]
    add_lora(unet, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], 0)
    with torch.no_grad():  # B away from zero, so the LoRA path counts in the output and the gradients
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
    return unet


def forward_backward(unet) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    out = unet(x, torch.tensor([10, 700]), encoder_hidden_states=ehs).sample
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", sorted(CASES))
def test_options_keep_outputs_gradients_and_names(case):
    ref_out, ref_grads = forward_backward(lora_unet())
    unet = speed.apply(lora_unet(), speed.Accelerator(**CASES[case]))
    keys = list(unet.state_dict())
    out, grads = forward_backward(unet)
    assert torch.allclose(out, ref_out, atol=1e-5, rtol=1e-4), (out - ref_out).abs().max()
    assert grads.keys() == ref_grads.keys() and grads
    worst = max((grads[k] - ref_grads[k]).abs().max().item() for k in grads)
    assert worst < 1e-5, f"{case}: gradients differ by {worst:.2e}"
    assert keys == list(lora_unet().state_dict())  # checkpoints and exports keep their names
    if CASES[case].get("channels_last"):
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    if CASES[case].get("attention") == "eager":
        assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor"}


def test_fused_adamw_takes_the_same_steps():
    def run(fused: bool) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        w = torch.nn.Parameter(torch.linspace(-1, 1, 64))
        opt, _ = build_optimizer([w], OptimSection(lr=1e-2, fused=fused), max_steps=5)
        for step in range(5):
            (w.sin() * (step + 1)).sum().backward()
            opt.step()
            opt.zero_grad()
        return w.detach(), opt

    (looped, opt_l), (fused, opt_f) = run(False), run(True)
    assert opt_f.defaults["fused"] and not opt_l.defaults.get("fused")
    assert torch.allclose(looped, fused, atol=1e-6) and not torch.equal(looped, torch.linspace(-1, 1, 64))


def test_options_are_config_fields_with_named_errors():
    cfg = load_config("configs/lora.yaml", [TINY_RANDOM, "train.compile=true", "train.channels_last=true",
                                             "train.attention=eager", "optim.fused=true", "strategy.name=ddp"])
    assert (cfg.train.compile, cfg.train.channels_last, cfg.train.attention, cfg.optim.fused) == (
        True, True, "eager", True)
    with pytest.raises(ConfigError, match="train.attention"):
        load_config("configs/lora.yaml", ["train.attention=flash"])
    with pytest.raises(ConfigError, match="train.channels_last: needs strategy.name ddp"):
        load_config("configs/lora.yaml", ["train.channels_last=true", "strategy.name=deepspeed"])
    with pytest.raises(ConfigError, match="train.compile_mode"):
        load_config("configs/lora.yaml", ["train.compile_mode=fast"])


@pytest.mark.eval  # CI: each option on the model (above), the serving engine's batches (test_serve_engine.py)
def test_serving_engine_with_every_option_draws_the_same_images(tiny_model_path, tmp_path):
    import io
    from dataclasses import replace

    import numpy as np
    from PIL import Image

    from diffray.serve.config import parse_args
    from diffray.serve.engine import ImageEngine
    from diffray.serve.schemas import Job
    from testkit.adapters import random_lora

    random_lora(tiny_model_path, tmp_path / "a", seed=1)
    random_lora(tiny_model_path, tmp_path / "b", seed=2)
    base, a, b = (Job(prompt="a red circle", n=1, width=64, height=64, steps=3, guidance=7.5, seed=5, adapters=x)
                  for x in ((), (("a", 1.0),), (("b", 0.7),)))
    # The base model's 2 images first: a compiled UNet then holds a graph of the batch shape that a mixed
    # call of a and b would have, without that call's LoRA hooks (which compile would never see).
    calls = [[replace(base, n=2)], [a, b], [a], [b], [base]]

    def images(generator: dict) -> list[np.ndarray]:
        engine = ImageEngine(parse_args({"model": tiny_model_path, "adapters_dir": str(tmp_path),
                                         "generator": generator}), device="cpu")
        engine.acquire(["a", "b"])
        return [np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)
                for jobs in calls for out in engine.run(jobs) for png in out]

    plain = images({})
    fast = images({"attention": "eager", "channels_last": True, "compile": True, "compile_backend": "aot_eager"})
    assert len(plain) == len(fast) == 7 and np.abs(plain[2] - plain[0]).max() > 20  # the LoRA changes the image
    for k, (got, want) in enumerate(zip(fast, plain)):
        assert np.abs(got - want).max() <= 1, f"image {k}"  # float noise, at most one level
