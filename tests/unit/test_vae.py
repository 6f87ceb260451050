"""`method: vae` without Ray: config rules, the loss terms, seeded from-scratch init, the grid and the
exported scaling factor (and its rows after a resume)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from diffray.errors import ConfigError
from diffray.methods import load_config, validate_config
from diffray.trainers.session import WorkerEnv
from diffray.trainers.vae.task import VaeTask

REPO = Path(__file__).resolve().parents[2]
ENV = WorkerEnv(0, 1, torch.device("cpu"), "fp32")


def task_of(tiny_model_path, **vae) -> VaeTask:
    return VaeTask(validate_config({"method": "vae", "vae": vae, "run": {"seed": 5}}), tiny_model_path, ENV)


def batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"sample_id": torch.arange(n), "pixel_values": torch.rand(n, 3, 64, 64, generator=g) * 2 - 1}


def test_config_validates_and_refuses_a_latent_cache():
    cfg = load_config(REPO / "configs" / "vae.yaml")
    assert cfg.method == "vae" and cfg.vae.kl_weight == 1e-4 and cfg.vae.scaling_samples == 64
    with pytest.raises(ConfigError, match=r"data\.cache: method vae trains the VAE"):
        load_config(REPO / "configs" / "vae.yaml", ["data.cache=auto"])
    with pytest.raises(ConfigError, match=r"vae\.kl_weight: Input should be greater than or equal to 0"):
        load_config(REPO / "configs" / "vae.yaml", ["vae.kl_weight=-1"])


def test_loss_is_reconstruction_plus_weighted_kl_and_keyed(tiny_model_path):
    plain, weighted = task_of(tiny_model_path, kl_weight=0.0), task_of(tiny_model_path, kl_weight=0.5)
    b = batch()
    with torch.no_grad():
        recon, mean, logvar = plain.module(b["pixel_values"], [0, 1, 2, 3], 3)
        err = recon - b["pixel_values"]
        want = err.abs().mean((1, 2, 3)) + (err**2).mean((1, 2, 3))
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean((1, 2, 3))
        assert torch.allclose(plain.losses(plain.module, b, 3), want, atol=1e-6)
        assert torch.allclose(weighted.losses(weighted.module, b, 3), want + 0.5 * kl, atol=1e-6)
        assert torch.equal(plain.losses(plain.module, b, 3), plain.losses(plain.module, b, 3))  # keyed draw
        assert not torch.equal(plain.losses(plain.module, b, 3), plain.losses(plain.module, b, 4))
    assert all(p.requires_grad for p in plain.module.parameters())


def test_from_scratch_is_seeded(tiny_model_path):
    a, b, base = task_of(tiny_model_path, from_scratch=True), task_of(tiny_model_path, from_scratch=True), task_of(tiny_model_path)
    sa, sb, s0 = a.module.state_dict(), b.module.state_dict(), base.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert max((sa[k] - s0[k]).abs().max().item() for k in sa) > 1e-3


def test_export_scaling_factor_gives_unit_latents_and_grid(tiny_model_path, tmp_path):
    from diffusers import AutoencoderKL

    task = task_of(tiny_model_path, scaling_samples=6)
    for _ in range(2):
        task.keep_rows(batch()["pixel_values"])
    assert sum(len(r) for r in task.rows) == 6
    grid = task.validation_grid(1)
    assert grid.size[1] > 2 * 64 - 1
    with torch.no_grad():
        out = task.export(tmp_path / "vae", {"method": "vae"})
        vae = AutoencoderKL.from_pretrained(out)
        x = torch.cat(task.rows)
        latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert abs(latents.std().item() - 1.0) < 1e-4


def numbered_stream(name, cfg, env, skip: int = 0):
    """Stands in for `session.data_stream`: micro-batch i is the same tensor on every read, as on resume."""
    for i in itertools.count(skip):
        g = torch.Generator().manual_seed(i)
        yield {"sample_id": torch.arange(4) + 4 * i, "pixel_values": torch.rand(4, 3, 64, 64, generator=g) * 2 - 1}


def test_resumed_task_keeps_the_rows_and_scaling_factor_of_a_straight_run(tiny_model_path, monkeypatch):
    # The kept rows are the first ones the stream yields; a resume from step 2 skips those batches, yet its
    # grid and exported scaling_factor must be those of the run without the restart.
    monkeypatch.setattr("diffray.trainers.session.data_stream", numbered_stream)
    straight, resumed = task_of(tiny_model_path, scaling_samples=6), task_of(tiny_model_path, scaling_samples=6)
    straight.start(None, {"step": 0})
    resumed.start(None, {"step": 2})
    with torch.no_grad():
        for step in (1, 2, 3):
            straight.next_loss(straight.module, step)
        resumed.next_loss(resumed.module, 3)
    assert next(straight.stream)["sample_id"].tolist() == next(resumed.stream)["sample_id"].tolist()
    assert sum(len(r) for r in resumed.rows) == 6
    assert torch.equal(torch.cat(resumed.rows), torch.cat(straight.rows))
    assert resumed.scaling_factor() == straight.scaling_factor()
