"""SDXL LoRA on Ray Train (local cluster, 2 ZeRO-2 workers, `builtin:tiny-sdxl`): the shipped config runs
as-is and its loss falls, the exported LoRA loads with stock `StableDiffusionXLPipeline.load_lora_weights`
and reproduces the trained UNet (rebuilt from the ZeRO shards) on both encoders' conditioning, and a
resumed run equals a straight one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffray.methods import load_config
from diffray.models.adapters import LORA_WEIGHTS, read_card
from diffray.models.family import StableDiffusionXL
from diffray.models.loading import resolve_model_path
from diffray.trainers.runner import run_training
from testkit.adapters import Probe

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "lora_sdxl.yaml"


def events(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_shipped_sdxl_lora_config_learns_and_its_artifact_loads_in_stock_sdxl(ray_cluster, tmp_path,
                                                                               model_from_zero_checkpoint):
    from diffusers import StableDiffusionXLPipeline

    model_path = resolve_model_path("builtin:tiny-sdxl")
    cfg = load_config(CONFIG, [f"run.storage_path={tmp_path / 'runs'}", "train.progress_bar=false"])
    assert cfg.model.path == "builtin:tiny-sdxl" and cfg.strategy.zero_stage == 2 and cfg.scaling.num_workers == 2
    result = run_training(cfg)
    assert result.steps == cfg.train.max_steps == 60
    # The random tiny SDXL starts near loss 1.08; LoRA on its attention brings it down (fixed seed).
    assert result.loss_last_mean < result.loss_first_mean - 0.05, result.summary_line()
    assert (Path(result.run_dir) / "logs" / "validation" / "step_000060.png").is_file()  # rendered by SDXL
    card = read_card(result.artifact_dir)
    assert card["method"] == "lora" and card["steps"] == 60

    probe = Probe(*model_from_zero_checkpoint(result.run_dir, cfg, model_path), family=StableDiffusionXL())
    pipe = StableDiffusionXLPipeline.from_pretrained(model_path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    assert probe.error(pipe.unet) > 1e-3  # the base differs from the trained model...

    def draw():
        return pipe("a red circle on a blue background", num_inference_steps=4, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="np").images

    base_img = draw()
    pipe.load_lora_weights(result.artifact_dir)
    assert probe.error(pipe.unet) < 1e-5  # ...and the stock pipeline with the artifact is the trained model
    assert abs(draw() - base_img).mean() > 1e-3


@pytest.mark.slow
def test_sdxl_resume_equals_a_straight_run(ray_cluster, tmp_path):
    """4 steps + resume to 8 equals 8 straight steps to 1e-6 (random crops and flips on, so each row's
    size/crop conditioning and both tokenizers' ids come back the same on resume)."""
    def cfg(name: str, steps: int):
        return load_config(CONFIG, [f"run.storage_path={tmp_path / 'runs'}", f"run.name={name}", "data.center_crop=false",
                                    f"train.max_steps={steps}", "train.checkpoint_every=4", "train.validate_every=null",
                                    "train.micro_batch_size=2", "train.progress_bar=false", "data.caption_dropout=0.2"])

    straight = run_training(cfg("straight", 8))
    assert run_training(cfg("resumed", 4)).steps == 4
    resumed = run_training(cfg("resumed", 8))
    assert [e["resumed_from_step"] for e in events(resumed.run_dir) if e.get("event") == "start"] == [0, 4]
    got, want = (load_file(str(Path(r.artifact_dir) / LORA_WEIGHTS)) for r in (resumed, straight))
    assert got.keys() == want.keys() and got
    worst = max((got[k] - want[k]).abs().max().item() for k in got)
    assert worst < 1e-6, f"max |resumed - straight| = {worst:.2e}"
