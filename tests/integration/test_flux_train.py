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
    assert read_card(result.artifact_dir)["method"] == "lora" and read_card(result.artifact_dir)["family"] == "flux"
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


def events(run_dir: str) -> list[dict]:
    import json

    return [json.loads(line) for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.eval  # CI: Flux LoRA training (default suite), flow matching (unit/test_flux.py), exact resume on SD
def test_flux_resume_under_zero3_equals_a_straight_run_with_logit_normal_sampling_and_a_shift(ray_cluster,
                                                                                               tmp_path):
    """Under ZeRO-3 with gradient checkpointing, from the latent cache (how Flux fits a GPU: no VAE, T5 or
    CLIP work per step), 4 steps + resume to 8 equals 8 straight steps to 1e-6 (random crops and flips,
    caption dropout, logit-normal sigmas shifted by 3, guidance 1.0: every draw keyed, so it comes back the
    same); a run with uniform sampling (same guidance) has another first loss (the sampling settings reach
    the loss)."""
    def cfg(name: str, steps: int, *extra: str):
        return load_config(CONFIG, [f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}",
                                    "data.center_crop=false", f"train.max_steps={steps}", "train.checkpoint_every=4",
                                    "train.validate_every=null", "train.micro_batch_size=2", "train.progress_bar=false",
                                    "data.caption_dropout=0.2", "strategy.zero_stage=3",
                                    "train.gradient_checkpointing=true", "data.cache=auto", *extra])

    flow = ["flow.timestep_sampling=logit_normal", "flow.shift=3.0", "flow.guidance=1.0"]
    straight = run_training(cfg("straight", 8, *flow))
    assert run_training(cfg("resumed", 4, *flow)).steps == 4
    resumed = run_training(cfg("resumed", 8, *flow))
    assert [e["resumed_from_step"] for e in events(resumed.run_dir) if e.get("event") == "start"] == [0, 4]
    steps = [e for e in events(straight.run_dir) if "loss" in e and "event" not in e]
    assert len(steps) == 8 and not any(e["vae_encode_calls"] or e["text_encoder_calls"] for e in steps)
    got, want = (load_file(str(Path(r.artifact_dir) / LORA_WEIGHTS)) for r in (resumed, straight))
    assert got.keys() == want.keys()
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    assert worst < 1e-6, f"max |resumed - straight| = {worst:.2e}"
    uniform = run_training(cfg("uniform", 1, "train.checkpoint_every=1", "flow.guidance=1.0"))
    first = [next(e["loss"] for e in events(r.run_dir) if "loss" in e and "event" not in e)
             for r in (straight, uniform)]
    assert abs(first[0] - first[1]) > 1e-4, first


@pytest.mark.slow
@pytest.mark.eval  # CI: DreamBooth on SD and Flux LoRA training (default suite)
def test_flux_dreambooth_lora_with_prior_preservation_learns_and_loads_in_stock_flux(ray_cluster, tmp_path):
    """configs/dreambooth_flux.yaml as shipped (40 steps; at 20 the loss has not moved yet): class images
    drawn by the Flux base at the training size, instance and class rows in each step's forward, the loss
    falls, the LoRA loads in `FluxPipeline`; DreamBooth full mode is refused on Flux, naming the field."""
    from diffusers import FluxPipeline
    from PIL import Image

    from diffray.errors import ConfigError
    from diffray.methods import method_of

    path = CONFIG.parent / "dreambooth_flux.yaml"
    cfg = load_config(path, [f"run.storage_path={tmp_path / 'runs'}", "train.progress_bar=false",
                             f"dreambooth.class_data_dir={tmp_path / 'class'}"])
    result = run_training(cfg)
    steps = [e for e in events(result.run_dir) if "loss" in e and "event" not in e]
    rows = cfg.train.micro_batch_size * cfg.scaling.num_workers
    assert len(steps) == 40 and all((e["instance_rows"], e["class_rows"]) == (rows, rows) for e in steps)
    assert result.loss_last_mean < result.loss_first_mean - 0.1, result.summary_line()
    pngs = sorted((tmp_path / "class").rglob("*.png"))
    assert len(pngs) == 8 and Image.open(pngs[0]).size == (64, 64)
    pipe = FluxPipeline.from_pretrained(resolve_model_path("builtin:tiny-flux"), use_safetensors=True)
    pipe.load_lora_weights(result.artifact_dir)
    assert read_card(result.artifact_dir)["instance_prompt"] == "a photo of sks widget"
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
    with pytest.raises(ConfigError, match="dreambooth.mode"):
        method_of("dreambooth").check(load_config(path, ["dreambooth.mode=full"]), resolve_model_path(cfg.model.path))
