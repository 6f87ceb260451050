"""DreamBooth on Ray Train (local cluster, tiny model, the sample "sks widget" subject): prior
preservation with class images generated once by a Ray Data job, LoRA and full fine-tuning."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffray.data.folder import folder_rows
from diffray.methods import load_config
from diffray.models.adapters import LORA_WEIGHTS, read_card
from diffray.trainers.dreambooth.class_images import ensure_class_images
from diffray.trainers.runner import run_training
from testkit.models import TINY_RANDOM

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def db_cfg(tmp_path, *overrides: str):
    return load_config(REPO / "configs" / "dreambooth.yaml",
                       [TINY_RANDOM, f"run.storage_path={tmp_path / 'runs'}", "train.progress_bar=false",
                        f"dreambooth.class_data_dir={tmp_path / 'class'}", *overrides])


def step_events(run_dir: str) -> list[dict]:
    lines = (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "loss" in e and "event" not in e]


def losses(run_dir: str) -> list[float]:
    return [e["loss"] for e in step_events(run_dir)]


def test_lora_with_prior_preservation_learns_and_reuses_class_images(ray_cluster, tmp_path, tiny_model_path):
    from diffusers import StableDiffusionPipeline

    cfg = db_cfg(tmp_path)
    class_dir, generated = ensure_class_images(cfg, tiny_model_path)
    class_dir = Path(class_dir)
    assert generated == cfg.dreambooth.num_class_images == 8
    pngs = sorted(class_dir.glob("*.png"))
    assert len(pngs) == 8 and Image.open(pngs[0]).size == (64, 64)
    meta = [json.loads(x) for x in (class_dir / "metadata.jsonl").read_text().splitlines()]
    assert [m["file_name"] for m in meta] == [p.name for p in pngs] and {m["text"] for m in meta} == {"a photo of a widget"}
    stamps = {p.name: p.stat().st_mtime_ns for p in pngs}

    result = run_training(cfg)  # generates nothing: the 8 images are reused
    assert {p.name: p.stat().st_mtime_ns for p in class_dir.glob("*.png")} == stamps
    assert json.loads((class_dir / "generated.json").read_text())["generated"] == 8
    assert ensure_class_images(cfg, tiny_model_path)[1] == 0
    # Asking for more generates only the missing ones.
    more = cfg.model_copy(update={"dreambooth": cfg.dreambooth.model_copy(update={"num_class_images": 10})})
    assert ensure_class_images(more, tiny_model_path)[1] == 2 and len(list(class_dir.glob("*.png"))) == 10

    ls = losses(result.run_dir)
    assert result.steps == 40 and len(ls) == 40
    # Prior preservation reached every step: each step's forward passes held micro_batch_size class rows
    # per worker beside as many instance rows, and the loss is instance loss + weight x class loss.
    rows = cfg.train.micro_batch_size * cfg.scaling.num_workers
    for e in step_events(result.run_dir):
        assert (e["instance_rows"], e["class_rows"]) == (rows, rows), e
        assert np.isfinite(e["class_loss"]) and e["class_loss"] > 0, e
        assert abs(e["loss"] - e["instance_loss"] - cfg.dreambooth.prior_loss_weight * e["class_loss"]) < 1e-5, e
    assert result.loss_last_mean < result.loss_first_mean - 0.03, result.summary_line()
    grid = Image.open(Path(result.run_dir) / "logs" / "validation" / "step_000040.png")
    assert grid.size[1] >= 2 * 64  # instance-prompt row and class-prompt row
    card = read_card(result.artifact_dir)
    assert card["method"] == "dreambooth" and card["mode"] == "lora" and card["instance_prompt"] == "a photo of sks widget"

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    before = pipe("a photo of sks widget", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    pipe.load_lora_weights(result.artifact_dir, weight_name=LORA_WEIGHTS)
    after = pipe("a photo of sks widget", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                 output_type="np").images
    assert abs(after - before).mean() > 1e-3


# `make test-eval`: full fine-tuning's pipeline export is in the default suite and its ZeRO-3 run in the slow
# one (test_full_train.py); this adds DreamBooth's full mode under ZeRO-3.
@pytest.mark.slow
@pytest.mark.eval
def test_full_finetune_zero3_exports_a_pipeline_matching_the_trained_unet(ray_cluster, tmp_path, tiny_model_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from diffusers import StableDiffusionPipeline

    cfg = db_cfg(tmp_path, "run.name=db-full", "dreambooth.mode=full", "strategy.zero_stage=3",
                 "dreambooth.num_class_images=2", "train.micro_batch_size=1", "train.max_steps=4",
                 "train.checkpoint_every=4", "train.validate_every=4", "optim.lr=1e-4")
    result = run_training(cfg)
    assert result.steps == 4
    assert (Path(result.run_dir) / "logs" / "validation" / "step_000004.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(result.artifact_dir, safety_checker=None)
    exported = pipe.unet.state_dict()
    ckpt = sorted(p for p in Path(result.run_dir).glob("checkpoint_*") if p.is_dir())[-1]
    trained = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="state", exclude_frozen_parameters=True)
    trained = {k.removeprefix("unet."): v for k, v in trained.items()}
    assert set(trained) == set(exported)
    assert max((trained[k].float() - exported[k].float()).abs().max().item() for k in trained) < 1e-6
    base = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None).unet.state_dict()
    assert max((base[k] - exported[k]).abs().max().item() for k in base) > 1e-5  # it trained
    assert read_card(result.artifact_dir)["mode"] == "full"


@pytest.mark.slow
@pytest.mark.eval  # CI: class images on local disk (default suite), the latent cache on S3 (test_data_pipeline.py)
def test_class_images_beside_a_latent_cache_on_object_storage_are_made_once_and_read_back(s3, ray_cluster, tmp_path,
                                                                                            tiny_model_path):
    """No shared filesystem: with `data.cache` on S3 the class images go there too, made once, and are read back
    as the training's class dataset (from the URI: any node can)."""
    from diffray.trainers.dreambooth import dataset_sources

    bucket = s3.bucket("dreambooth")
    cfg = db_cfg(tmp_path, "dreambooth.class_data_dir=null", "dreambooth.num_class_images=3",
                 "dreambooth.class_inference_steps=2", f"data.cache={bucket}/latents")
    class_dir, generated = ensure_class_images(cfg, tiny_model_path)
    assert class_dir.startswith(f"{bucket}/latents/class-images/") and generated == 3
    keys = s3.keys(class_dir)
    assert [k.rsplit("/", 1)[1] for k in keys] == ["00000.png", "00001.png", "00002.png", "generated.json",
                                                  "metadata.jsonl"]
    meta = s3.fs.open_input_stream(f"{class_dir[5:]}/metadata.jsonl").read().decode().splitlines()
    assert [json.loads(m)["file_name"] for m in meta] == ["00000.png", "00001.png", "00002.png"]
    assert ensure_class_images(cfg, tiny_model_path) == (class_dir, 0), "reused, not made again"
    source = dataset_sources(cfg, tiny_model_path)["class"]
    fs, root, rows = folder_rows(source.path, prompt=source.prompt, id_offset=source.id_offset)
    assert root == class_dir[5:] and fs.type_name == "s3"
    assert [(r["sample_id"], r["caption"], r["error"]) for r in rows] == [
        (1_000_000 + i, "a photo of a widget", "") for i in range(3)]
    with Image.open(io.BytesIO(fs.open_input_stream(f"{root}/{rows[0]['source']}").read())) as img:
        assert img.size == (64, 64)
