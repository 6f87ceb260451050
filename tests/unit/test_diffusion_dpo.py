"""Diffusion-DPO pieces without Ray: the loss against a hand computation, the reference pass (adapters
off), reading a pair's preference from its labels, and the method's config."""

from __future__ import annotations

import math

import pytest
import torch

from diffray.data.parquet import preference
from diffray.errors import ConfigError
from diffray.methods import validate_config
from diffray.trainers.components.dpo import diffusion_dpo_loss


def test_dpo_loss_is_the_hand_computed_value_and_gradient():
    # Two pairs: preferred rows first, then rejected rows. beta = 10.
    model = torch.tensor([0.2, 0.5, 0.4, 0.3], requires_grad=True)
    ref = torch.tensor([0.3, 0.5, 0.3, 0.4])
    terms = diffusion_dpo_loss(model, ref, beta=10.0)
    # model_diff = [0.2 - 0.4, 0.5 - 0.3] = [-0.2, 0.2]; ref_diff = [0.0, 0.1]
    # inside = -0.5 * 10 * ([-0.2, 0.2] - [0.0, 0.1]) = [1.0, -0.5]
    # loss = (log(1 + e^-1) + log(1 + e^0.5)) / 2
    assert torch.allclose(terms.inside, torch.tensor([1.0, -0.5]), atol=1e-6)
    assert torch.allclose(terms.model_diff, torch.tensor([-0.2, 0.2]), atol=1e-6)
    assert torch.allclose(terms.ref_diff, torch.tensor([0.0, 0.1]), atol=1e-6)
    want = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert abs(terms.loss.item() - want) < 1e-6
    terms.loss.backward()
    # d loss / d mse_w[i] = sigmoid(-inside_i) * beta / 2 / B; the rejected rows get the opposite sign.
    s = [1 / (1 + math.exp(1.0)), 1 / (1 + math.exp(-0.5))]
    want_grad = torch.tensor([s[0] * 2.5, s[1] * 2.5, -s[0] * 2.5, -s[1] * 2.5])
    assert torch.allclose(model.grad, want_grad, atol=1e-6)


def test_a_policy_equal_to_its_reference_has_loss_log_2_and_no_margin():
    losses = torch.rand(8)
    terms = diffusion_dpo_loss(losses.clone(), losses, beta=5000.0)
    assert abs(terms.loss.item() - math.log(2)) < 1e-7 and not (terms.inside != 0).any()


def test_dpo_loss_refuses_mismatched_or_odd_batches():
    with pytest.raises(ValueError, match="two"):
        diffusion_dpo_loss(torch.rand(3), torch.rand(3), 1.0)
    with pytest.raises(ValueError, match="two"):
        diffusion_dpo_loss(torch.rand(4), torch.rand(2), 1.0)


@pytest.mark.parametrize("first, second, want", [
    (1.0, 0.0, 0), (0.0, 1.0, 1), (0.5, 0.5, None), (0.0, 0.0, None),  # both bad: 0/0
    (1.0, None, 0), (0.0, None, 1), (0.5, None, None), (0.8, None, 0), (None, 0.0, None),
    (float("nan"), None, None), (1.0, float("nan"), None)])
def test_preference_from_labels(first, second, want):
    assert preference(first, second) == want


def test_reference_pass_switches_every_adapter_off_and_back_on(tiny_model_path):
    from diffusers import UNet2DConditionModel

    from diffray.models.adapters import add_lora
    from diffray.trainers.denoising import adapters_off

    unet = UNet2DConditionModel.from_pretrained(tiny_model_path, subfolder="unet")
    x, t = torch.randn(1, unet.config.in_channels, 8, 8), torch.tensor([10])
    states = torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        base = unet(x, t, encoder_hidden_states=states).sample
    add_lora(unet, 4, 4, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], seed=0)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        adapted = unet(x, t, encoder_hidden_states=states).sample
        with adapters_off(unet):
            off = unet(x, t, encoder_hidden_states=states).sample
        again = unet(x, t, encoder_hidden_states=states).sample
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(off, base) and torch.equal(again, adapted)
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == trainable


def test_config_defaults_and_refusals(tmp_path):
    cfg = validate_config({"method": "diffusion_dpo", "data": {"path": str(tmp_path)}})
    d = cfg.data
    assert (d.caption_column, d.image_column, d.pair_column, d.label_column, d.pair_label_column) == (
        "caption", "jpg_0", "jpg_1", "label_0", "label_1")
    assert cfg.dpo.beta == 5000.0 and cfg.lora.rank > 0
    assert validate_config({"method": "diffusion_dpo"}).data.path == "builtin:sample/pairs"
    for bad, field in (({"cache": "auto"}, "data.cache"), ({"aspect_buckets": True}, "data.aspect_buckets"),
                       ({"mask_column": "m"}, "data.mask_column"), ({"format": "imagefolder"}, "format")):
        with pytest.raises(ConfigError, match=field):
            validate_config({"method": "diffusion_dpo", "data": {"path": str(tmp_path), **bad}})
    with pytest.raises(ConfigError, match="dpo.beta"):
        validate_config({"method": "diffusion_dpo", "data": {"path": str(tmp_path)}, "dpo": {"beta": 0}})
    with pytest.raises(ConfigError, match="export.formats"):
        validate_config({"method": "diffusion_dpo", "data": {"path": str(tmp_path)}, "lora": {"variant": "dora"},
                         "export": {"formats": ["kohya"]}})


def test_data_prepare_refuses_preference_pairs_before_ray_starts():
    from diffray.trainers.datasets import prepare_data

    with pytest.raises(ConfigError, match="pairs"):
        prepare_data(validate_config({"method": "diffusion_dpo"}))
