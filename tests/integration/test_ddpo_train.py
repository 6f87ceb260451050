"""DDPO on Ray Train (local cluster, tiny model, configs/ddpo.yaml: 2 workers + 2 reward actors): the JPEG
rewards move the policy the way they pay (SD and SDXL), a reward actor killed mid-call is restarted and the
epoch completes, and the aligned adapter loads with stock diffusers (SD's and SDXL's pipelines) and
reproduces the trained UNet."""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from diffray.methods import load_config
from diffray.models.adapters import LORA_WEIGHTS, read_card
from diffray.trainers.runner import run_training
from testkit.models import TINY_RANDOM

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
EPOCHS = 12  # x 64 samples (2 workers x 32) = 48 optimizer steps at LR
LR = "optim.lr=1e-2"  # tuned on the random tiny model (the shipped config's 1e-3 is for the pretrained one)
# DDPO as published, every step trained and no KL, as tuned on the random model (the shipped config's step floor
# and KL are for the pretrained one, EVALS.md); the KL test below adds its own
PUBLISHED = ("ddpo.min_step_std=0", "ddpo.kl_coef=0")
MARGIN_KB = 0.01  # paired over the same 128 seeds, base vs trained; the per-sample std is ~0.06 kB
EVAL_SAMPLES = 128


def events(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


def epoch_lines(run_dir: str) -> list[dict]:
    return [e for e in events(run_dir) if "reward_mean" in e]


def ddpo_cfg(root: Path, name: str, *overrides: str):
    return load_config(REPO / "configs" / "ddpo.yaml", [TINY_RANDOM, f"run.storage_path={root}", f"run.name={name}",
                                                       LR, "train.progress_bar=false", *overrides])


@lru_cache(maxsize=None)
def trained(root: str, reward: str, seed: int):
    """One run per (reward, seed) per session, shared by the tests that need it."""
    cfg = ddpo_cfg(Path(root), f"ddpo-{reward}-{seed}", f"ddpo.reward.name={reward}", f"run.seed={seed}",
                   f"train.max_steps={EPOCHS}", f"train.checkpoint_every={EPOCHS}", "train.validate_every=6",
                   *PUBLISHED)
    return cfg, run_training(cfg)


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ddpo-runs"))


def mean_jpeg_kb(pipe, cfg, seed: int = 999) -> float:
    """Mean JPEG size of EVAL_SAMPLES images DDPO-sampled from the pipeline's UNet (fixed prompts/seeds), with
    the conditioning of the pipeline's family (SDXL's: both encoders, pooled embedding, size ids)."""
    from diffray.models.family import family_of
    from diffray.trainers.components.ddpo import ddim_scheduler, draw_prompts, sample_trajectory
    from diffray.trainers.components.rewards import get_reward
    from diffray.trainers.ddpo.task import decode_images

    d = cfg.ddpo
    family = family_of(pipe.name_or_path)

    def cond(prompts):
        with torch.no_grad():
            return family.conditioning(pipe, family.tokenize(pipe, prompts), {}, (d.resolution, d.resolution))

    prompts = draw_prompts(d.prompts, EVAL_SAMPLES, [seed])
    traj = sample_trajectory(pipe.unet, ddim_scheduler(pipe.scheduler), cond(prompts), cond([d.negative_prompt]),
                             d.sample_steps, d.guidance, d.eta, torch.Generator().manual_seed(seed),
                             (4, d.resolution // 8, d.resolution // 8))
    return float(get_reward("jpeg_incompressibility")(decode_images(pipe.vae, traj.final_latents)).mean())


def load_pipe(model_path: str):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("reward, seed", [
    ("jpeg_compressibility", 0),  # the default suite runs one case; its opposite reward and the seed matrix
    pytest.param("jpeg_incompressibility", 0, marks=pytest.mark.eval),  # are `make test-eval`'s
    pytest.param("jpeg_compressibility", 1, marks=pytest.mark.eval),
    pytest.param("jpeg_compressibility", 2, marks=pytest.mark.eval),
    pytest.param("jpeg_incompressibility", 1, marks=pytest.mark.eval),
    pytest.param("jpeg_incompressibility", 2, marks=pytest.mark.eval),
])
def test_jpeg_reward_moves_the_policy(ray_cluster, runs_root, tiny_model_path, reward, seed):
    cfg, result = trained(runs_root, reward, seed)
    assert result.steps == EPOCHS
    lines = epoch_lines(result.run_dir)
    assert [e["step"] for e in lines] == list(range(1, EPOCHS + 1))
    assert all(set(e) >= {"reward_std", "prompt_reward_means", "approx_kl", "clip_fraction"} for e in lines)
    assert set(lines[0]["prompt_reward_means"]) <= set(cfg.ddpo.prompts)
    assert (Path(result.run_dir) / "logs" / "samples" / f"epoch_{EPOCHS:06d}.png").is_file()

    # Before vs after on the same 64 prompts and seeds: the base UNet, then the exported adapter loaded into it.
    pipe = load_pipe(tiny_model_path)
    before = mean_jpeg_kb(pipe, cfg)
    pipe.load_lora_weights(result.artifact_dir)
    after = mean_jpeg_kb(pipe, cfg)
    print(f"{reward} seed={seed}: JPEG kB before={before:.4f} after={after:.4f} "
          f"(epoch 1 reward {lines[0]['reward_mean']:.4f}, epoch {EPOCHS} {lines[-1]['reward_mean']:.4f})")
    if reward == "jpeg_compressibility":
        assert after < before - MARGIN_KB
    else:
        assert after > before + MARGIN_KB


def unet_shift(model_path: str, artifact: str) -> float:
    """Mean |UNet output with the adapter - without| on fixed inputs: how far a run moved from the base."""
    pipe = load_pipe(model_path)
    g = torch.Generator().manual_seed(1)
    latents, t, hidden = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([50, 300, 600, 900]), torch.randn(
        4, 77, 32, generator=g)
    with torch.no_grad():
        base = pipe.unet(latents, t, encoder_hidden_states=hidden).sample
        pipe.load_lora_weights(artifact)
        return float((pipe.unet(latents, t, encoder_hidden_states=hidden).sample - base).abs().mean())


@pytest.mark.slow  # ~1 min: in CI's slow suite, which keeps the default suite under its 20 minutes
def test_kl_to_the_base_holds_the_policy_near_it(ray_cluster, runs_root, tiny_model_path):
    """`ddpo.kl_coef`: the same run as the JPEG test's but for the KL term moves the UNet a fraction as far, and
    logs the KL (0 before the first update, then positive) every epoch."""
    _, free = trained(runs_root, "jpeg_compressibility", 0)
    cfg = ddpo_cfg(Path(runs_root), "ddpo-kl", "ddpo.reward.name=jpeg_compressibility", "run.seed=0",
                   f"train.max_steps={EPOCHS}", f"train.checkpoint_every={EPOCHS}", "train.validate_every=null",
                   *PUBLISHED, "ddpo.kl_coef=100")
    held = run_training(cfg)
    kls = [e["kl_ref"] for e in epoch_lines(held.run_dir)]
    assert len(kls) == EPOCHS and all(math.isfinite(k) and k > 0 for k in kls), kls
    assert "kl_ref" not in epoch_lines(free.run_dir)[0]
    shifts = unet_shift(tiny_model_path, held.artifact_dir), unet_shift(tiny_model_path, free.artifact_dir)
    print(f"UNet shift from the base: kl_coef 100 {shifts[0]:.5f}, none {shifts[1]:.5f}")
    assert 0 < shifts[0] < 0.5 * shifts[1]


@pytest.mark.slow
def test_kl_reference_under_zero3_is_the_base_as_under_zero2(ray_cluster, tmp_path):
    """Under ZeRO-3 the weights are partitioned and the KL's reference pass calls the UNet outside the engine's
    forward, with the LoRA switched off: its KL must be the one ZeRO-2 measures (float noise apart), not 0
    (the LoRA left on) or garbage (unGathered weights)."""
    kls = {}
    for stage in (2, 3):
        cfg = ddpo_cfg(tmp_path, f"kl-z{stage}", "train.max_steps=1", "train.checkpoint_every=1",
                       "train.validate_every=null", "ddpo.kl_coef=100", f"strategy.zero_stage={stage}")
        result = run_training(cfg)
        assert read_card(result.artifact_dir)["method"] == "ddpo"
        kls[stage] = epoch_lines(result.run_dir)[0]["kl_ref"]
    print(f"kl_ref after one epoch: ZeRO-2 {kls[2]:.6f}, ZeRO-3 {kls[3]:.6f}")
    assert kls[2] > 0 and kls[3] == pytest.approx(kls[2], rel=0.1)


@pytest.mark.slow
@pytest.mark.eval  # CI: SD's DDPO (default suite), SDXL's guided sampling and log-probs (unit/test_ddpo_components.py)
def test_reward_actor_killed_mid_call_is_restarted_and_the_epoch_completes(ray_cluster, tmp_path, faults,
                                                                           model_from_zero_checkpoint):
    """On SDXL with guidance (CI's SDXL DDPO run: both encoders, pooled embedding and size ids through
    sampling, PPO and export; the SD runs are the default suite's)."""
    from diffusers import StableDiffusionXLPipeline

    from diffray.models.family import StableDiffusionXL
    from diffray.models.loading import resolve_model_path
    from testkit.adapters import Probe

    faults(kill_reward_actor_at_step=2)
    cfg = ddpo_cfg(tmp_path / "runs", "ddpo-kill", "train.max_steps=3", "train.checkpoint_every=3",
                   "model.path=builtin:tiny-sdxl", "ddpo.guidance=3.0", "ddpo.negative_prompt=blurry")
    assert cfg.scaling.num_workers == 2 and cfg.ddpo.reward.actors == 2
    result = run_training(cfg)
    assert result.steps == 3
    lines = {e["step"]: e for e in epoch_lines(result.run_dir)}
    assert sorted(lines) == [1, 2, 3]
    assert lines[1]["reward_retries"] == 0 and lines[1]["reward_actor_restarts"] == 0
    # The killed call was resubmitted to the restarted actor; exactly one actor restarted.
    assert lines[2]["reward_retries"] >= 1 and lines[2]["reward_actor_restarts"] == 1
    assert lines[3]["reward_retries"] == 0 and lines[3]["reward_actor_restarts"] == 1
    assert all(np.isfinite(lines[s]["reward_mean"]) for s in lines)
    assert sum(e.get("event") == "start" for e in events(result.run_dir)) == 1, "no worker-group restart"

    # The same command with more epochs resumes from the last checkpoint, stat tracker included.
    ckpt = sorted(p for p in Path(result.run_dir).glob("checkpoint_*") if p.is_dir())[-1]
    tracker = json.loads((ckpt / "trainer_state.json").read_text())["tracker"]
    # 3 epochs x 2 workers x 32 samples over 3 prompts: every prompt's buffer is full.
    assert set(tracker) == set(cfg.ddpo.prompts)
    assert all(len(v) == cfg.ddpo.stat_buffer_size for v in tracker.values())
    resumed = run_training(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4})}))
    assert resumed.steps == 4
    assert [e["resumed_from_step"] for e in events(result.run_dir) if e.get("event") == "start"] == [0, 3]
    assert [e["step"] for e in epoch_lines(result.run_dir)] == [1, 2, 3, 4]

    # The aligned SDXL LoRA (rebuilt from the resumed run's ZeRO shards) is what stock SDXL loads.
    model_path = resolve_model_path("builtin:tiny-sdxl")
    assert read_card(resumed.artifact_dir)["family"] == "stable-diffusion-xl"
    probe = Probe(*model_from_zero_checkpoint(result.run_dir, cfg, model_path), family=StableDiffusionXL())
    pipe = StableDiffusionXLPipeline.from_pretrained(model_path, use_safetensors=True)
    assert probe.error(pipe.unet) > 1e-3
    pipe.load_lora_weights(resumed.artifact_dir)
    assert probe.error(pipe.unet) < 1e-5


def test_aligned_adapter_loads_with_stock_diffusers_and_reproduces_the_trained_unet(ray_cluster, runs_root,
                                                                                     tiny_model_path,
                                                                                     model_from_zero_checkpoint):
    cfg, result = trained(runs_root, "jpeg_compressibility", 0)
    assert (Path(result.artifact_dir) / LORA_WEIGHTS).is_file()
    card = read_card(result.artifact_dir)
    assert card["method"] == "ddpo" and card["steps"] == EPOCHS and card["reward"]["name"] == "jpeg_compressibility"

    # The trained weights, rebuilt independently from the ZeRO-2 shards of the final checkpoint.
    model, _ = model_from_zero_checkpoint(result.run_dir, cfg, tiny_model_path)

    pipe = load_pipe(tiny_model_path)
    g = torch.Generator().manual_seed(1)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600])
    hidden = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        base = pipe.unet(latents, t, encoder_hidden_states=hidden).sample
        pipe.load_lora_weights(result.artifact_dir)
        loaded = pipe.unet(latents, t, encoder_hidden_states=hidden).sample
        expected = model(latents, t, encoder_hidden_states=hidden)
    assert (loaded - base).abs().max() > 1e-3, "the adapter changes the UNet"
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.eval  # ~3 min; CI runs SDXL DDPO in the reward-actor test above (3+1 epochs, stock SDXL load)
def test_sdxl_jpeg_reward_moves_the_guided_policy_and_the_adapter_loads_in_stock_sdxl(ray_cluster, tmp_path,
                                                                                      model_from_zero_checkpoint):
    """DDPO on SDXL: sampling and PPO condition on both encoders, the pooled embedding and size ids (with
    guidance, so the negative prompt's too); the reward moves the policy and the LoRA loads in stock SDXL.
    Measured: JPEG 3.924 -> 3.856 kB over 128 paired samples (margin 0.01)."""
    from diffusers import StableDiffusionXLPipeline

    from diffray.models.family import StableDiffusionXL
    from diffray.models.loading import resolve_model_path
    from testkit.adapters import Probe

    model_path = resolve_model_path("builtin:tiny-sdxl")
    cfg = ddpo_cfg(tmp_path, "ddpo-sdxl", "model.path=builtin:tiny-sdxl", f"train.max_steps={EPOCHS}",
                   f"train.checkpoint_every={EPOCHS}", "train.validate_every=6", "ddpo.guidance=3.0",
                   "ddpo.negative_prompt=blurry", *PUBLISHED)
    result = run_training(cfg)
    lines = epoch_lines(result.run_dir)
    assert result.steps == EPOCHS and [e["step"] for e in lines] == list(range(1, EPOCHS + 1))
    assert (Path(result.run_dir) / "logs" / "samples" / f"epoch_{EPOCHS:06d}.png").is_file()
    card = read_card(result.artifact_dir)
    assert card["method"] == "ddpo" and card["family"] == "stable-diffusion-xl"

    pipe = StableDiffusionXLPipeline.from_pretrained(model_path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    probe = Probe(*model_from_zero_checkpoint(result.run_dir, cfg, model_path), family=StableDiffusionXL())
    assert probe.error(pipe.unet) > 1e-3
    before = mean_jpeg_kb(pipe, cfg)
    pipe.load_lora_weights(result.artifact_dir)
    assert probe.error(pipe.unet) < 1e-5  # the stock pipeline with the artifact is the trained model
    after = mean_jpeg_kb(pipe, cfg)
    print(f"SDXL jpeg_compressibility: JPEG kB before={before:.4f} after={after:.4f} "
          f"(epoch 1 reward {lines[0]['reward_mean']:.4f}, epoch {EPOCHS} {lines[-1]['reward_mean']:.4f})")
    assert after < before - MARGIN_KB
