"""The EMA of trained weights (`train.ema_decay`): diffusers' formula, state round trip, the swap used for
validation and export, and the config rules."""

from __future__ import annotations

import pytest
import torch

from diffray.errors import ConfigError
from diffray.methods import validate_config
from diffray.trainers.components.ema import Ema, decay_at


def test_decay_follows_diffusers_warmup():
    assert decay_at(0.9999, 1) == 0.0  # the first update copies the weights
    assert decay_at(0.9999, 2) == pytest.approx(2 / 11) and decay_at(0.9999, 11) == pytest.approx(11 / 20)
    assert decay_at(0.5, 100) == 0.5


@pytest.mark.parametrize("on_cpu", [False, True])
def test_matches_diffusers_ema_model_step_by_step(on_cpu):
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g))]
    ours = Ema({"a": params[0], "b": params[1]}, decay=0.8, on_cpu=on_cpu)
    theirs = EMAModel(params, decay=0.8)
    for _ in range(15):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=g))
        ours.update({"a": params[0], "b": params[1]})
        theirs.step(params)
        for name, shadow in zip("ab", theirs.shadow_params):
            assert (ours.shadow[name] - shadow).abs().max().item() < 1e-6
    assert ours.steps == theirs.optimization_step == 15


def test_state_round_trip_and_swap_restores_the_trained_weights():
    p = torch.nn.Parameter(torch.zeros(4))
    ema = Ema({"p": p}, decay=0.5)
    for v in (1.0, 2.0, 3.0):
        with torch.no_grad():
            p.fill_(v)
        ema.update({"p": p})
    # k=1: 1; k=2 (d=2/11): 2/11*1 + 9/11*2; k=3 (d=3/12, under the 0.5 cap): d*prev + (1-d)*3
    want = 0.25 * (2 / 11 + 18 / 11) + 0.75 * 3
    assert torch.allclose(ema.shadow["p"], torch.full((4,), want))
    tensors, meta = ema.state_dict()
    other = Ema({"p": torch.nn.Parameter(torch.ones(4))}, decay=0.5)
    other.load_state_dict(tensors, meta)
    assert other.steps == 3 and torch.equal(other.shadow["p"], ema.shadow["p"])
    with ema.swapped({"p": p}):
        assert torch.allclose(p.detach(), torch.full((4,), want))
    assert torch.equal(p.detach(), torch.full((4,), 3.0)) and p.requires_grad
    with pytest.raises(KeyError, match="EMA state lacks"):
        other.load_state_dict({}, meta)


def test_config_rules():
    cfg = validate_config({"method": "full", "train": {"ema_decay": 0.999, "ema_on_cpu": True}})
    assert cfg.train.ema_decay == 0.999 and cfg.train.ema_on_cpu
    assert validate_config({"method": "lora"}).train.ema_decay is None
    with pytest.raises(ConfigError, match=r"train\.ema_decay: not supported with strategy\.zero_stage 3"):
        validate_config({"method": "full", "train": {"ema_decay": 0.99}, "strategy": {"zero_stage": 3}})
    # DDP ignores zero_stage: allowed.
    validate_config({"method": "lora", "train": {"ema_decay": 0.99}, "strategy": {"name": "ddp", "zero_stage": 3}})
    with pytest.raises(ConfigError, match=r"train\.ema_decay: Input should be less than 1"):
        validate_config({"method": "lora", "train": {"ema_decay": 1.0}})
