"""The learned reward without Ray: the Bradley-Terry loss against a hand computation, the network's
prompt conditioning and position channels, the artifact's round trip into DDPO's `learned` reward, and
the method's config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffray.errors import ConfigError, ModelError
from diffray.methods import validate_config
from diffray.models.reward import RewardNet, bradley_terry_loss, load_reward_model, save_reward_model


def test_bradley_terry_loss_is_the_hand_computed_value():
    w = torch.tensor([2.0, 0.0], requires_grad=True)
    l = torch.tensor([1.0, 0.5])
    loss, right = bradley_terry_loss(w, l)
    # margins [1.0, -0.5]: (log(1 + e^-1) + log(1 + e^0.5)) / 2; d/dw_i = -sigmoid(-margin_i) / 2
    assert abs(loss.item() - (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2) < 1e-6
    assert right.tolist() == [True, False]
    loss.backward()
    want = torch.tensor([-1 / (1 + math.exp(1.0)) / 2, -1 / (1 + math.exp(-0.5)) / 2])
    assert torch.allclose(w.grad, want, atol=1e-6)


def test_the_score_depends_on_the_prompt_and_on_where_things_are():
    torch.manual_seed(0)
    net = RewardNet(4, 16, channels=8, layers=2)
    for film in net.films:  # past the identity init, as after training
        torch.nn.init.normal_(film.weight, std=0.5)
    latents = torch.zeros(1, 4, 8, 8)
    latents[:, :, 1, 1] = 3.0  # one bright cell, top left
    moved = torch.zeros(1, 4, 8, 8)
    moved[:, :, 6, 6] = 3.0  # the same cell, bottom right
    a, b = torch.randn(1, 16), torch.randn(1, 16)
    with torch.no_grad():
        assert abs(net(latents, a) - net(latents, b)).item() > 1e-4  # the prompt matters
        assert abs(net(latents, a) - net(moved, a)).item() > 1e-4  # so does where things are


def test_artifact_round_trip_and_refusals(tmp_path):
    torch.manual_seed(1)
    net = RewardNet(4, 16, channels=8, layers=2)
    save_reward_model(tmp_path / "rm", net, 64, {"method": "reward_model", "base_model": "builtin:tiny"})
    loaded, cfg = load_reward_model(tmp_path / "rm")
    x, t = torch.randn(3, 4, 8, 8), torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x, t), net(x, t))
    assert cfg["resolution"] == 64 and cfg["channels"] == 8
    with pytest.raises(ModelError, match="not a reward model dir"):
        load_reward_model(tmp_path)
    (tmp_path / "rm" / "reward_config.json").write_text('{"channels": 8}')
    with pytest.raises(ModelError, match="does not load"):
        load_reward_model(tmp_path / "rm")


def test_learned_reward_scores_with_the_base_models_vae_and_text_encoder(tmp_path, caplog):
    from PIL import Image

    from diffray.trainers.components.rewards import get_reward
    from diffray.world.grammar import Scene
    from diffray.world.render import render

    torch.manual_seed(2)
    net = RewardNet(4, 64, channels=8, layers=2)  # builtin:tiny's text states are 64 wide
    for film in net.films:
        torch.nn.init.normal_(film.weight, std=0.5)
    save_reward_model(tmp_path / "rm", net, 64, {"method": "reward_model", "base_model": "builtin:tiny"})
    reward = get_reward("learned", path=str(tmp_path / "rm"))
    images = [render(Scene("shape", c, "circle", "blue", 0.3, 0.5, 0.5)) for c in ("red", "green")]
    prompts = ["a red circle on a blue background", "a green circle on a blue background"]
    scores = reward(images, prompts)
    assert scores.dtype == np.float32 and scores.shape == (2,) and np.isfinite(scores).all()
    assert scores[0] != scores[1]
    assert np.allclose(reward(np.stack([np.asarray(i) for i in images]), prompts), scores, atol=1e-5)
    assert isinstance(images[0], Image.Image)
    assert not [r for r in caplog.records if "resized" in r.getMessage()]
    # another resolution is scored resized, and said once
    small = [im.resize((32, 32)) for im in images]
    with caplog.at_level("WARNING", logger="diffray.models.reward"):
        assert np.isfinite(reward(small, prompts)).all() and np.isfinite(reward(small, prompts)).all()
    said = [r.getMessage() for r in caplog.records if "resized" in r.getMessage()]
    assert len(said) == 1 and "64x64" in said[0] and "32x32" in said[0], said
    with pytest.raises(ConfigError, match="path"):
        get_reward("learned", path=str(tmp_path / "missing"))
    save_reward_model(tmp_path / "narrow", RewardNet(4, 32, 8, 2), 64, {"base_model": "builtin:tiny"})
    with pytest.raises(ModelError, match="another base model"):
        get_reward("learned", path=str(tmp_path / "narrow"))


def test_config_defaults():
    cfg = validate_config({"method": "reward_model"})
    assert cfg.data.path == "builtin:sample/pairs" and cfg.data.pair_column == "jpg_1"
    assert cfg.train.validation_grids is False and cfg.optim.lr == 1e-3
    with pytest.raises(ConfigError, match="data.cache"):
        validate_config({"method": "reward_model", "data": {"cache": "auto"}})
