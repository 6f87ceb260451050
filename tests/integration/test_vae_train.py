"""`method: vae` on Ray Train (local cluster, tiny model, the world's sample images): the reconstruction
loss falls, the artifact loads in stock diffusers and its scaling_factor gives unit-variance latents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffray.methods import load_config
from diffray.models.adapters import read_card
from diffray.trainers.runner import run_training
from testkit.models import TINY_RANDOM

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.eval  # CI runs configs/vae.yaml end to end in the README's train block
def test_vae_learns_and_exports_a_unit_variance_autoencoder(ray_cluster, tmp_path):
    from diffusers import AutoencoderKL

    from diffray.data.sample import write_sample_dataset

    data = write_sample_dataset(tmp_path / "world", num_images=16) / "train"
    cfg = load_config(REPO / "configs" / "vae.yaml", [TINY_RANDOM, f"run.storage_path={tmp_path / 'runs'}",
                                                      f"data.path={data}",
                                                      "train.max_steps=16", "train.checkpoint_every=16",
                                                      "train.validate_every=16", "train.progress_bar=false",
                                                      "data.validation_fraction=0.25"])
    result = run_training(cfg)
    assert result.steps == 16
    lines = (Path(result.run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    losses = [e["loss"] for e in map(json.loads, lines) if "loss" in e and "event" not in e]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    assert 0 < result.metrics["val_loss"] < 2
    assert (Path(result.run_dir) / "logs" / "validation" / "step_000016.png").is_file()

    vae = AutoencoderKL.from_pretrained(result.artifact_dir)
    card = read_card(result.artifact_dir)
    assert card["method"] == "vae" and card["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    rows = [json.loads(x) for x in (data / "metadata.jsonl").read_text().splitlines()]
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(data / r["file_name"]).convert("RGB"), dtype=np.float32))
                     .permute(2, 0, 1) for r in rows]) / 127.5 - 1
    with torch.no_grad():
        std = (vae.encode(x).latent_dist.mean * vae.config.scaling_factor).std().item()
    assert 0.8 < std < 1.25, std
