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


@pytest.mark.slow
@pytest.mark.eval  # ~3 min on 2 cores (two runs). CI: unit/test_vae.py checks the same rows without Ray
def test_resumed_run_exports_the_scaling_factor_of_a_straight_run(ray_cluster, tmp_path, faults):
    # The rows behind scaling_factor are the first ones each rank trains on; a worker killed at step 3 resumes
    # from step 2's checkpoint, past those batches, and must still export the straight run's factor.
    cards = {}
    for name, drill in [("straight", {}), ("killed", {"kill_rank_at_step": {"rank": 0, "step": 3, "registered": 2}})]:
        faults(**drill)
        cfg = load_config(REPO / "configs" / "vae.yaml", [TINY_RANDOM, f"run.storage_path={tmp_path / 'runs'}",
                                                          f"run.name={name}", "train.max_steps=4",
                                                          "train.checkpoint_every=2", "train.validate_every=null",
                                                          "train.validation_grids=false", "train.progress_bar=false"])
        result = run_training(cfg)
        cards[name] = read_card(result.artifact_dir)
    lines = (tmp_path / "runs" / "killed" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [e["resumed_from_step"] for e in map(json.loads, lines) if e.get("event") == "start"] == [0, 2]
    straight, killed = cards["straight"], cards["killed"]
    assert killed["scaling_rows"] == straight["scaling_rows"] == 16  # 4 steps x micro-batch 4 on rank 0
    assert killed["scaling_factor"] == pytest.approx(straight["scaling_factor"], rel=1e-6)
