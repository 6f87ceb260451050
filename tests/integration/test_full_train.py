"""`method: full` on Ray Train (local cluster, tiny model): every UNet weight trains, the artifact is a
stock diffusers pipeline holding exactly the trained weights, and a resumed run continues exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffray.methods import load_config
from diffray.models.adapters import read_card
from diffray.trainers.runner import run_training
from testkit.models import TINY_RANDOM

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def full_cfg(tmp_path, name: str, *overrides: str):
    base = [f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}", "train.max_steps=8",
            "train.checkpoint_every=4", "train.micro_batch_size=2", "train.progress_bar=false",
            "train.validate_every=null", "optim.lr_scheduler=constant", "optim.lr=1e-3"]
    return load_config(REPO / "configs" / "full.yaml", [TINY_RANDOM] + base + list(overrides))


def starts(run_dir: str) -> list[int]:
    lines = (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return [e["resumed_from_step"] for e in map(json.loads, lines) if e.get("event") == "start"]


def interrupted_run(tmp_path, name: str, first_steps: int, *overrides: str):
    """Run `first_steps` steps, then the same command to its max_steps (a resume); returns the second result."""
    cfg = full_cfg(tmp_path, name, *overrides)
    first = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": first_steps})})
    assert run_training(first).steps == first_steps
    resumed = run_training(cfg)
    assert resumed.steps == cfg.train.max_steps and starts(resumed.run_dir) == [0, first_steps]
    return resumed


def weights_of(run_dir: str, prefix: str = "unet.") -> dict[str, torch.Tensor]:
    """The trained weights (of one part) of the run's last checkpoint, read independently from its ZeRO
    shards (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())[-1]
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="state", exclude_frozen_parameters=True)
    return {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}


def unet_of(artifact_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(artifact_dir) / "unet" / "diffusion_pytorch_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b) and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def fixed_noise_loss(unet, comps, data_dir: Path) -> float:
    """Mean denoising loss of every row of an imagefolder at fixed noise/timesteps (keys 0..7)."""
    import numpy as np
    from PIL import Image

    from diffray.trainers.components.diffusion import noise_latents

    rows = [json.loads(x) for x in (data_dir / "metadata.jsonl").read_text().splitlines()]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(data_dir / r["file_name"]).convert("RGB")
                                                      .resize((64, 64)), dtype=np.float32)).permute(2, 0, 1)
                          for r in rows]) / 127.5 - 1
    ids = comps.tokenizer([r["text"] for r in rows], padding="max_length", max_length=77, return_tensors="pt").input_ids
    batch = {"sample_id": torch.arange(len(rows)), "pixel_values": pixels}
    losses = []
    with torch.no_grad():
        hidden = comps.text_encoder(ids)[0]
        for key in range(8):
            n = noise_latents(comps.vae, comps.noise_scheduler, batch, "cpu", torch.float32, 10**6 + key, 0)
            pred = unet(n.noisy, n.timesteps, encoder_hidden_states=hidden).sample
            losses.append(torch.nn.functional.mse_loss(pred, n.noise).item())
    return sum(losses) / len(losses)


@pytest.mark.slow
@pytest.mark.eval  # CI: full fine-tuning under ZeRO-2 (default suite), the TE latent cache through LoRA
def test_zero3_with_text_encoder_latent_cache_and_validation(ray_cluster, tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = full_cfg(tmp_path, "z3-te", "strategy.zero_stage=3", "full.train_text_encoder=true", "train.max_steps=4",
                   f"data.cache={tmp_path / 'cache'}", "data.validation_fraction=0.25", "train.validate_every=4")
    result = run_training(cfg)
    assert result.steps == 4 and 0 < result.metrics["val_loss"] < 10
    assert (Path(result.run_dir) / "logs" / "validation" / "step_000004.png").is_file()
    assert list((tmp_path / "cache").iterdir()), "the latent cache was built and used"
    pipe = StableDiffusionPipeline.from_pretrained(result.artifact_dir, safety_checker=None)
    assert max_diff(weights_of(result.run_dir, "unet."), pipe.unet.state_dict()) < 1e-6
    te = pipe.text_encoder.state_dict()
    trained_te = weights_of(result.run_dir, "text_encoder.")
    assert max_diff(trained_te, {k: te[k] for k in trained_te}) < 1e-6


# The resume machinery is the shared engine's (LoRA's SIGKILL, checkpoint and DDP resume tests and this
# module's ZeRO-2 EMA resume run in CI); full fine-tuning under each engine is the `make test-eval` matrix.
@pytest.mark.eval
@pytest.mark.parametrize("engine", [["strategy.name=ddp"], ["strategy.zero_stage=3"]], ids=["ddp", "zero3"])
def test_resume_is_exact(ray_cluster, tmp_path, engine):
    straight = run_training(full_cfg(tmp_path, "straight", *engine))
    resumed = interrupted_run(tmp_path, "resumed", 4, *engine)
    assert max_diff(unet_of(resumed.artifact_dir), unet_of(straight.artifact_dir)) < 1e-6


@pytest.mark.eval  # CI: LoRA's SIGKILL drill (default suite) and full's ZeRO-2 EMA resume (slow suite)
def test_worker_sigkill_under_zero3_recovers_to_the_straight_run(ray_cluster, tmp_path, faults):
    common = ["train.checkpoint_every=2", "strategy.zero_stage=3"]  # weights sharded: resume rebuilds them
    straight = run_training(full_cfg(tmp_path, "straight", *common))
    faults(kill_rank_at_step={"rank": 1, "step": 5})
    result = run_training(full_cfg(tmp_path, "killed", "failure.max_failures=1", *common))
    assert result.steps == 8 and (Path(result.run_dir) / "logs" / "faults" / "rank1-step5").is_file()
    begin = starts(result.run_dir)  # the newest registered checkpoint: step 4, or 2 if 4 was not yet registered
    assert begin[0] == 0 and len(begin) == 2 and begin[1] in (2, 4), begin
    assert max_diff(unet_of(result.artifact_dir), unet_of(straight.artifact_dir)) < 1e-6


def checkpoints_by_step(run_dir: str) -> dict[int, Path]:
    dirs = [p for p in Path(run_dir).glob("checkpoint_*") if (p / "trainer_state.json").is_file()]
    return {json.loads((p / "trainer_state.json").read_text())["step"]: p for p in dirs}


def zero_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="state", exclude_frozen_parameters=True)
    return {k.removeprefix("unet."): v for k, v in sd.items()}


def test_full_zero2_learns_exports_ema_and_raw_as_a_stock_pipeline(ray_cluster, tmp_path, tiny_model_path):
    """One ZeRO-2 run with an EMA: it learns, the artifact is a stock pipeline whose UNet is exactly the
    hand-computed EMA of the per-step trained weights and whose `non_ema` variant is exactly the last
    trained weights, and validation reports both."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from diffray.data.sample import write_sample_dataset
    from diffray.models.loading import load_components

    decay, steps = 0.9, 6
    data = write_sample_dataset(tmp_path / "eight", num_images=8) / "train"
    cfg = full_cfg(tmp_path, "ema", f"data.path={data}", "data.caption_dropout=0.25", f"train.max_steps={steps}",
                   "train.checkpoint_every=1", f"train.keep_checkpoints={steps}", f"train.ema_decay={decay}",
                   "data.validation_fraction=0.25", f"train.validate_every={steps}")
    result = run_training(cfg)
    assert result.steps == steps
    ckpts = checkpoints_by_step(result.run_dir)
    assert sorted(ckpts) == list(range(1, steps + 1))
    # The EMA by hand over the trained weights after each step (read from each step's ZeRO-2 shards),
    # with diffusers' warmup: decay 0 at step 1, then min(decay, k / (k + 9)).
    ema: dict[str, torch.Tensor] = {}
    for k in range(1, steps + 1):
        w = zero_weights(ckpts[k])
        d = 0.0 if k == 1 else min(decay, k / (k + 9))
        ema = {n: d * ema[n] + (1 - d) * w[n].float() if ema else w[n].float() for n in w}
    pipe = StableDiffusionPipeline.from_pretrained(result.artifact_dir, safety_checker=None)
    assert max_diff(ema, pipe.unet.state_dict()) < 1e-6
    raw = UNet2DConditionModel.from_pretrained(result.artifact_dir, subfolder="unet", variant="non_ema")
    assert max_diff(w, raw.state_dict()) < 1e-6 and max_diff(w, ema) > 1e-5  # the two differ
    card = read_card(result.artifact_dir)
    assert card["method"] == "full" and card["steps"] == steps and card["from_scratch"] is False
    assert card["weights"] == f"ema (decay {decay})"
    lines = (Path(result.run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    last = [e for e in map(json.loads, lines) if "val_loss" in e][-1]  # validation uses the EMA, reports both
    assert last["step"] == steps and last["val_loss"] == result.metrics["val_loss"]
    assert last["val_loss_raw"] != last["val_loss"]

    # The stock pipeline's UNet predicts what the trained (EMA) weights predict, and the run learned:
    # the loss of the trained weights on its own rows at fixed noise fell.
    comps = load_components(tiny_model_path)
    base_loss = fixed_noise_loss(comps.unet, comps, data)
    comps.unet.load_state_dict(ema)
    g = torch.Generator().manual_seed(1)
    latents, t, ids = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600]), torch.randint(0, 100, (2, 77))
    with torch.no_grad():
        hidden = comps.text_encoder(ids)[0]
        want = comps.unet(latents, t, encoder_hidden_states=hidden).sample
        got = pipe.unet(latents, t, encoder_hidden_states=hidden).sample
    assert (got - want).abs().max().item() < 1e-5
    trained_loss = fixed_noise_loss(raw, comps, data)
    assert trained_loss < base_loss - 0.01, (base_loss, trained_loss)


@pytest.mark.slow
@pytest.mark.parametrize("engine", [[], pytest.param(["strategy.name=ddp", "train.ema_on_cpu=true"], marks=pytest.mark.eval)],
                         ids=["zero2", "ddp-cpu"])
@pytest.mark.eval  # CI: EMA on full fine-tuning (default suite) and exact resume (test_lora_train.py)
def test_resumed_run_continues_the_same_ema(ray_cluster, tmp_path, engine):
    common = ["train.max_steps=4", "train.checkpoint_every=2", "train.ema_decay=0.9", *engine]
    straight = run_training(full_cfg(tmp_path, "ema-straight", *common))
    resumed = interrupted_run(tmp_path, "ema-resumed", 2, *common)
    assert max_diff(unet_of(resumed.artifact_dir), unet_of(straight.artifact_dir)) < 1e-6
