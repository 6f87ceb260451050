"""DDPO trainer pieces without a cluster: config validation, driver-side preflight, the epoch helpers
(advantages over gathered rewards, prompt draws, best/worst picks), inline reward scoring, and the LoRA
export of conv + attention targets loading back exactly with stock diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffray.config import apply_overrides
from diffray.methods import validate_config
from diffray.trainers.ddpo import DDPOTrainConfig
from diffray.errors import ConfigError
from diffray.trainers.components.ddpo import PerPromptStatTracker, batch_advantages, best_and_worst, draw_prompts


def ddpo(*overrides: str):
    return validate_config(apply_overrides({"method": "ddpo"}, list(overrides)))


def test_defaults_validate_without_a_dataset():
    cfg = ddpo()
    assert isinstance(cfg, DDPOTrainConfig) and cfg.data is None
    assert cfg.ddpo.reward.name == "jpeg_compressibility" and cfg.ddpo.reward.actors == 1
    assert cfg.run.name == "ddpo-sample" and cfg.train.max_steps == 10


@pytest.mark.parametrize("override, expected", [
    ("data.path=builtin:sample", r"^data: DDPO trains on samples of ddpo.prompts, not a dataset"),
    ("lora.train_text_encoder=true", r"^lora.train_text_encoder: DDPO trains LoRA on the UNet only"),
    ("ddpo.resolution=60", r"ddpo.resolution must be a multiple of 8"),
    ("ddpo.sample_batch_size=5", r"ddpo.samples_per_epoch=16 must be a multiple of ddpo.sample_batch_size=5"),
    ("train.micro_batch_size=3", r"must be a multiple of train.micro_batch_size x train.grad_accum_steps = 3"),
    ("ddpo.eta=0", r"^ddpo.eta: Input should be greater than 0"),
    ("ddpo.timestep_fraction=1.5", r"^ddpo.timestep_fraction: Input should be less than or equal to 1"),
    ("ddpo.reward.actors=-1", r"^ddpo.reward.actors: Input should be greater than or equal to 0"),
    ("ddpo.reward.nme=x", r"^ddpo.reward.nme: unknown key \(allowed: actors, max_restarts, name, num_cpus"),
    ("ddpo.prompts=[]", r"^ddpo.prompts: List should have at least 1 item"),
    ("ddpo.images_per_prompt=3", r"ddpo.sample_batch_size=4 must be a multiple of ddpo.images_per_prompt=3"),
    ("ddpo.images_per_prompt=0", r"^ddpo.images_per_prompt: Input should be greater than or equal to 1"),
    ("ddpo.timestep_spacing=middle", r"^ddpo.timestep_spacing: Input should be 'leading', 'trailing' or 'linspace'"),
    ("ddpo.min_step_std=1", r"^ddpo.min_step_std: Input should be less than 1"),
])
def test_bad_settings_name_the_field(override, expected):
    with pytest.raises(ConfigError, match=expected):
        ddpo(override)


def test_preflight_checks_prompts_and_reward(tmp_path):
    from diffray.trainers.components.prompts import read_prompts as read
    from diffray.trainers.ddpo import preflight

    def read_prompts(d):
        return read(d.prompts, d.prompts_file, "ddpo.prompts_file")

    preflight(ddpo("ddpo.reward.options={quality: 80}"), "unused")
    with pytest.raises(ConfigError, match=r"^ddpo.reward.name: unknown reward 'sharpness' \(allowed: aesthetic, "):
        preflight(ddpo("ddpo.reward.name=sharpness"), "unused")
    with pytest.raises(ConfigError, match=r"^ddpo.reward.options: jpeg_compressibility: .*'clip_path'"):
        preflight(ddpo("ddpo.reward.options={clip_path: /x}"), "unused")
    with pytest.raises(ConfigError, match=r"^ddpo.prompts_file: prompts file not found"):
        preflight(ddpo(f"ddpo.prompts_file={tmp_path / 'missing.txt'}"), "unused")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ConfigError, match=r"holds no prompts"):
        read_prompts(ddpo(f"ddpo.prompts_file={tmp_path / 'empty.txt'}").ddpo)
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(ddpo(f"ddpo.prompts_file={tmp_path / 'p.txt'}").ddpo) == ["a cat", "a dog"]


def test_preflight_refuses_untrainable_steps_and_warns_when_the_sampler_cannot_explore(tiny_model_path, caplog):
    from diffray.trainers.ddpo import preflight

    with pytest.raises(ConfigError, match=r"^ddpo.min_step_std: no sampling step has sigma_t >= 0.1 \(sample_steps=2, "
                       r"'leading' spacing: 0.04\d, 0.02\d\)"):
        preflight(ddpo("ddpo.sample_steps=2", "ddpo.min_step_std=0.1"), tiny_model_path)
    with caplog.at_level("WARNING", logger="diffray.trainers.components.ddpo_steps"):
        preflight(ddpo("ddpo.sample_steps=2"), tiny_model_path)
        assert "every sampling step's sigma_t is below 0.1 (0.04" in caplog.text
        assert "ddpo.timestep_spacing=trailing" in caplog.text
        caplog.clear()
        preflight(ddpo("ddpo.sample_steps=2", "ddpo.timestep_spacing=trailing", "ddpo.min_step_std=0.1"),
                  tiny_model_path)
        preflight(ddpo("ddpo.sample_steps=5"), tiny_model_path)
        assert caplog.text == ""


def test_a_worker_trains_only_the_steps_min_step_std_keeps(tiny_model_path):
    from diffray.trainers.ddpo.task import DDPOTask
    from diffray.trainers.session import WorkerEnv

    env = WorkerEnv(0, 1, torch.device("cpu"), "fp32")
    task = DDPOTask(ddpo(f"model.path={tiny_model_path}", "ddpo.reward.actors=0", "ddpo.sample_steps=5",
                         "ddpo.min_step_std=0.1", "ddpo.timestep_fraction=0.5"), tiny_model_path, env)
    assert task.trained.tolist() == [0, 1, 2] and task.train_timesteps == 1 and task.grad_accum_steps == 1
    task = DDPOTask(ddpo(f"model.path={tiny_model_path}", "ddpo.reward.actors=0", "ddpo.sample_steps=2",
                         "ddpo.timestep_spacing=trailing"), tiny_model_path, env)
    assert task.scheduler.config.timestep_spacing == "trailing" and task.trained.tolist() == [0, 1]
    task.scheduler.set_timesteps(2)
    assert task.scheduler.timesteps.tolist() == [999, 499]


def test_advantages_from_gathered_rewards_match_on_every_rank():
    prompts = ["a", "b", "a", "b", "a", "b"]
    rewards = np.array([1.0, 10.0, 3.0, 20.0, 5.0, 30.0], dtype=np.float32)
    # Two ranks that saw the same gathered batch hold identical trackers and advantages.
    t0, t1 = PerPromptStatTracker(8, 2), PerPromptStatTracker(8, 2)
    a0, a1 = batch_advantages(prompts, rewards, t0), batch_advantages(prompts, rewards, t1)
    np.testing.assert_array_equal(a0, a1)
    assert t0.stats() == t1.stats()
    # Per prompt: 'a' rewards 1, 3, 5 -> mean 3, std sqrt(8/3).
    np.testing.assert_allclose(a0[[0, 2, 4]], (np.array([1, 3, 5]) - 3) / (np.sqrt(8 / 3) + 1e-6), rtol=1e-5)
    # Without a tracker: normalised over the whole batch.
    whole = batch_advantages(prompts, rewards, None)
    np.testing.assert_allclose(whole, (rewards - rewards.mean()) / (rewards.std() + 1e-6), rtol=1e-5)


def test_grouped_draws_repeat_each_prompt_and_are_normalised_within_the_group_from_the_first_epoch():
    from diffray.trainers.ddpo.task import stat_tracker

    prompts = [f"p{i}" for i in range(50)]
    assert draw_prompts(prompts, 8, [0, 1, 0, 0], 1) == draw_prompts(prompts, 8, [0, 1, 0, 0])  # 1: as before
    grouped = draw_prompts(prompts, 8, [0, 1, 0, 0], 4)
    assert grouped[:4] == [grouped[0]] * 4 and grouped[4:] == [grouped[4]] * 4
    assert grouped[0] == draw_prompts(prompts, 2, [0, 1, 0, 0])[0]
    with pytest.raises(ValueError, match="not a multiple"):
        draw_prompts(prompts, 6, [0], 4)
    with pytest.raises(ConfigError, match=r"images_per_prompt > 1 .* needs ddpo.per_prompt_advantages: true"):
        ddpo("ddpo.images_per_prompt=2", "ddpo.per_prompt_advantages=false")

    # A reward with per-prompt offsets (a Bradley-Terry model's are arbitrary): 'a' scores near 100, 'b' near
    # -100. Over the batch the offsets are all the advantages say; within each group they are gone.
    names = ["a"] * 4 + ["b"] * 4
    rewards = np.array([101, 99, 102, 98, -99, -101, -98, -102], dtype=np.float32)
    assert stat_tracker(ddpo("ddpo.images_per_prompt=1").ddpo).min_count == 16
    tracker = stat_tracker(ddpo("ddpo.images_per_prompt=4", "ddpo.sample_batch_size=8").ddpo)
    adv = tracker.update(names, rewards)
    np.testing.assert_allclose(adv[:4], (rewards[:4] - 100) / (np.std(rewards[:4]) + 1e-6), rtol=1e-5)
    np.testing.assert_array_equal(np.sign(adv), [1, -1, 1, -1, 1, -1, 1, -1])
    ungrouped = stat_tracker(ddpo().ddpo).update(names, rewards)
    np.testing.assert_array_equal(np.sign(ungrouped), [1, 1, 1, 1, -1, -1, -1, -1])
    assert stat_tracker(ddpo("ddpo.per_prompt_advantages=false").ddpo) is None


def test_a_worker_samples_its_batches_in_groups(tiny_model_path):
    from diffray.trainers.ddpo.task import DDPOTask
    from diffray.trainers.session import WorkerEnv

    cfg = ddpo(f"model.path={tiny_model_path}", "ddpo.reward.actors=0", "ddpo.prompts=[a, b, c, d, e, f, g, h]",
               "ddpo.sample_batch_size=8", "ddpo.images_per_prompt=4")
    task = DDPOTask(cfg, tiny_model_path, WorkerEnv(0, 1, torch.device("cpu"), "fp32"))
    drawn = task.batch_prompts(epoch=2, batch=1)
    assert drawn == [drawn[0]] * 4 + [drawn[4]] * 4
    assert task.tracker.min_count == 4


def test_prompt_draws_are_keyed_and_best_worst_picks():
    prompts = ["p0", "p1", "p2"]
    assert draw_prompts(prompts, 8, [0, 1, 0, 0]) == draw_prompts(prompts, 8, [0, 1, 0, 0])
    assert draw_prompts(prompts, 32, [0, 1, 0, 0]) != draw_prompts(prompts, 32, [0, 1, 1, 0])  # another rank
    assert set(draw_prompts(prompts, 64, [3])) == set(prompts)
    best, worst = best_and_worst(np.array([0.5, 3.0, -1.0, 2.0]), 2)
    assert best == [1, 3] and worst == [2, 0]
    assert best_and_worst(np.array([1.0]), 4) == ([0], [0])


def test_inline_reward_pool_scores_at_submit():
    from diffray.trainers.components.rewards import get_reward, jpeg_size_kb, to_pil_images
    from diffray.trainers.ddpo.pool import RewardPool

    images = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    pool = RewardPool([], get_reward("jpeg_incompressibility"), retries=0)
    pending = pool.submit(images, ["x"] * 3)
    np.testing.assert_allclose(pool.result(pending), [jpeg_size_kb(i) for i in to_pil_images(images)])
    assert pool.restarted_actors() == 0 and pool.resubmitted == 0


def test_conv_and_attention_lora_export_loads_back_exactly(tmp_path, tiny_model_path):
    from diffusers import StableDiffusionPipeline

    from diffray.models.adapters import add_lora, export_lora
    from diffray.models.loading import load_components

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_in", "conv_out", "proj_in", "proj_out",
               "time_emb_proj"]
    comps = load_components(tiny_model_path)
    add_lora(comps.unet, 4, 4.0, 0.0, targets, seed=0)
    with torch.no_grad():
        for name, p in comps.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    export_lora(tmp_path, comps.unet, None, {"method": "ddpo"})
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    g = torch.Generator().manual_seed(0)
    x, hidden, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([10, 500])
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=hidden).sample
        pipe.load_lora_weights(tmp_path)
        loaded = pipe.unet(x, t, encoder_hidden_states=hidden).sample
        expected = comps.unet(x, t, encoder_hidden_states=hidden).sample
    assert (loaded - base).abs().max() > 1e-3
    torch.testing.assert_close(loaded, expected, atol=1e-6, rtol=1e-5)
