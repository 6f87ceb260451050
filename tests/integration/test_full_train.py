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

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def full_cfg(tmp_path, name: str, *overrides: str):
    base = [f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}", "train.max_steps=8",
            "train.checkpoint_every=4", "train.micro_batch_size=2", "train.progress_bar=false",
            "train.validate_every=null", "optim.lr_scheduler=constant", "optim.lr=1e-3"]
    return load_config(REPO / "configs" / "full.yaml", base + list(overrides))


def starts(run_dir: str) -> list[int]:
    lines = (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return [e["resumed_from_step"] for e in map(json.loads, lines) if e.get("event") == "start"]


def checkpoint_weights(run_dir: str) -> dict[str, torch.Tensor]:
    """The UNet weights of the run's last checkpoint, read independently from its ZeRO shards."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = sorted(p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir())[-1]
    sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="state", exclude_frozen_parameters=True)
    return {k.removeprefix("unet."): v for k, v in sd.items()}


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


def test_full_zero2_learns_exports_stock_pipeline_and_resumes_exactly(ray_cluster, tmp_path, tiny_model_path):
    from diffusers import StableDiffusionPipeline

    from diffray.data.sample import write_sample_dataset
    from diffray.models.loading import load_components

    data = write_sample_dataset(tmp_path / "four", num_images=4) / "train"
    common = [f"data.path={data}", "data.caption_dropout=0.25"]
    result = run_training(full_cfg(tmp_path, "straight", *common))
    assert result.steps == 8
    exported = unet_of(result.artifact_dir)
    # The artifact holds exactly the trained weights of the final ZeRO-2 checkpoint.
    assert max_diff(checkpoint_weights(result.run_dir), exported) < 1e-6
    card = read_card(result.artifact_dir)
    assert card["method"] == "full" and card["steps"] == 8 and card["from_scratch"] is False

    # Stock diffusers loads it, and its UNet predicts what the trained weights predict.
    pipe = StableDiffusionPipeline.from_pretrained(result.artifact_dir, safety_checker=None)
    comps = load_components(tiny_model_path)
    base_loss = fixed_noise_loss(comps.unet, comps, data)
    comps.unet.load_state_dict(checkpoint_weights(result.run_dir))
    g = torch.Generator().manual_seed(1)
    latents, t, ids = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600]), torch.randint(0, 100, (2, 77))
    with torch.no_grad():
        hidden = comps.text_encoder(ids)[0]
        want = comps.unet(latents, t, encoder_hidden_states=hidden).sample
        got = pipe.unet(latents, t, encoder_hidden_states=hidden).sample
    assert (got - want).abs().max().item() < 1e-5
    # It learned: the loss on its own rows at fixed noise fell.
    trained_loss = fixed_noise_loss(pipe.unet, comps, data)
    assert trained_loss < base_loss - 0.01, (base_loss, trained_loss)

    # 4 steps, then the same command with max_steps 8 resumes from step 4 and ends where the straight run did.
    half = full_cfg(tmp_path, "resumed", *common)
    assert run_training(half.model_copy(update={"train": half.train.model_copy(update={"max_steps": 4})})).steps == 4
    resumed = run_training(half)
    assert resumed.steps == 8 and starts(resumed.run_dir) == [0, 4]
    assert max_diff(unet_of(resumed.artifact_dir), exported) < 1e-6
