"""Flux on Ray Train (local cluster, 2 ZeRO-2 workers, `builtin:tiny-flux`): the shipped LoRA config runs
as-is, its flow-matching loss falls, and the exported LoRA (diffusers' `transformer.` layout) loads with
stock `FluxPipeline.load_lora_weights`, reproducing the trained transformer (rebuilt from the ZeRO shards)
and its renders; `diffray generate`'s renderer draws at the model's size and honours the LoRA scale."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffray.generate import load_adapter, render
from diffray.methods import load_config
from diffray.models.adapters import LORA_WEIGHTS, read_card
from diffray.models.flux import Flux
from diffray.models.loading import resolve_model_path
from diffray.trainers.runner import run_training
from testkit.adapters import Probe

pytestmark = pytest.mark.integration
PROMPT = "a red circle on a blue background"
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lora_flux.yaml"


def test_shipped_flux_lora_config_learns_and_its_artifact_loads_in_stock_flux(ray_cluster, tmp_path,
                                                                               model_from_zero_checkpoint):
    from diffusers import FluxPipeline

    model_path = resolve_model_path("builtin:tiny-flux")
    cfg = load_config(CONFIG, [f"run.storage_path={tmp_path / 'runs'}", "train.progress_bar=false"])
    assert cfg.model.path == "builtin:tiny-flux" and cfg.strategy.zero_stage == 2 and cfg.scaling.num_workers == 2
    result = run_training(cfg)
    assert result.steps == cfg.train.max_steps == 60
    # The random tiny Flux starts near flow loss 1.85; LoRA on its attention brings it down (fixed seed).
    assert result.loss_last_mean < result.loss_first_mean - 0.1, result.summary_line()
    assert (Path(result.run_dir) / "logs" / "validation" / "step_000060.png").is_file()  # rendered by Flux
    assert read_card(result.artifact_dir)["method"] == "lora"
    layers = load_file(str(Path(result.artifact_dir) / LORA_WEIGHTS))
    assert layers and {k.split(".")[0] for k in layers} == {"transformer"}
    assert any(".single_transformer_blocks." in k for k in layers)

    family = Flux()
    model, comps = model_from_zero_checkpoint(result.run_dir, cfg, model_path)
    probe = Probe(model, comps, family=family)
    pipe = FluxPipeline.from_pretrained(model_path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert probe.error(pipe.transformer) > 1e-3  # the base differs from the trained model...
    base = np.asarray(render(pipe, [PROMPT], 0, 1, 3, 3.5)[0][0])
    load_adapter(pipe, result.artifact_dir)  # `diffray generate`'s loader: stock load_lora_weights
    assert probe.error(pipe.transformer) < 1e-5  # ...and the stock pipeline with the artifact is the trained model
    # generate's render: the VAE's size (64, not FluxPipeline's 1024) and the LoRA scale reaching the transformer
    assert base.shape == (64, 64, 3)
    assert np.array_equal(np.asarray(render(pipe, [PROMPT], 0, 1, 3, 3.5, lora_scale=0.0)[0][0]), base)
    assert np.abs(np.asarray(render(pipe, [PROMPT], 0, 1, 3, 3.5)[0][0]).astype(int) - base).mean() > 0.5

    def draw(p):
        return p(PROMPT, num_inference_steps=4, height=64, width=64,
                 max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="np").images

    trained = family.pipeline(comps, unet=model.unet)
    assert abs(draw(pipe) - draw(trained)).max() < 1e-4
