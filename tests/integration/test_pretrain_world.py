"""`diffray pretrain-world` end to end at a few steps, on the test cluster: the three stages train, the output
is a pipeline dir stock diffusers loads (with the word-level tokenizer, the text encoder of the caption-field
stage unchanged, and a ControlNet), a rerun skips
finished stages, and (make test-eval) the same seed gives the same losses at the same steps."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from diffray.world.pretrain import PretrainPlan, pretrain_world

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PLAN = PretrainPlan(seed=3, vae_images=32, unet_images=32, vae_steps=3, unet_steps=3, vae_batch=4, unet_batch=4,
                    text_steps=3, text_batch=4, num_workers=1, checkpoint_every=2, eval_num=2)
QUIET = dataclasses.replace(PLAN, eval_num=0)  # no eval stage
STAGES = ("world-vae", "world-unet")


def losses(work: Path, stage: str) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (work / "runs" / stage / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.eval  # CI: unit/test_world_model.py checks the shipped world model draws its world
def test_pretrain_world_runs_and_resumes(ray_cluster, tmp_path):
    import torch
    from diffusers import ControlNetModel, StableDiffusionPipeline
    from transformers import CLIPTextModel

    card = pretrain_world(tmp_path / "a", PLAN, tmp_path / "a.work", command="diffray pretrain-world a --seed 3")
    assert {k: v["steps"] for k, v in card["stages"].items()} == {"vae": 3, "text": 3, "unet": 3}
    assert set(card["stages"]["text"]["heldout_accuracy"]) == {"colour", "shape", "bg", "size", "position"}
    unet_cfg = card["stages"]["unet"]["config"]
    assert unet_cfg["full"]["train_text_encoder"] is False and "position0.5" in unet_cfg["data"]["path"]
    out = tmp_path / "a"
    assert json.loads((out / "diffray_model.json").read_text())["plan"]["seed"] == 3
    readme = (out / "README.md").read_text()
    assert "diffray pretrain-world a --seed 3" in readme and "| heldout | 2 |" in readme
    assert "| text | caption-fields | 3 |" in readme and "Text encoder, held-out captions" in readme
    assert set(card["eval"]) == {"prompts", "heldout"} and all(0 <= r["bg"] <= 1 for r in card["eval"].values())
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert pipe.tokenizer.tokenize("a cyan star") == ["a</w>", "cyan</w>", "star</w>"]
    vae_card = json.loads((tmp_path / "a.work" / "runs" / "world-vae" / "artifact" / "diffray_card.json").read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(vae_card["scaling_factor"])  # the trained VAE's factor
    img = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)
    cn = ControlNetModel.from_pretrained(out / "controlnet")
    assert torch.equal(cn.conv_in.weight, pipe.unet.conv_in.weight)
    # the UNet trained on the text encoder of stage 2, which ships unchanged (frozen)
    text = CLIPTextModel.from_pretrained(tmp_path / "a.work" / "random-with-vae-text", subfolder="text_encoder")
    assert all(torch.equal(a, b) for a, b in zip(text.parameters(), pipe.text_encoder.parameters()))

    first = {s: losses(tmp_path / "a.work", s) for s in STAGES}
    assert all(len(v) >= 1 for v in first.values())
    again = pretrain_world(tmp_path / "a", QUIET, tmp_path / "a.work")  # finished stages are not run again
    assert again["stages"] == card["stages"] and losses(tmp_path / "a.work", "world-unet") == first["world-unet"]


@pytest.mark.eval  # CI: the rows and their order that make it reproducible (test_data_pipeline.py's same-order test)
def test_pretrain_world_reproduces_its_losses_from_the_seed(ray_cluster, tmp_path):
    pretrain_world(tmp_path / "a", QUIET, tmp_path / "a.work")
    pretrain_world(tmp_path / "b", QUIET, tmp_path / "b.work")
    assert {s: losses(tmp_path / "b.work", s) for s in STAGES} == {s: losses(tmp_path / "a.work", s) for s in STAGES}
