"""DreamBooth pieces without Ray: the prior-preservation loss, full-mode parameters, class-folder keys,
and the instance-folder checks that run before any work starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffray.errors import ConfigError, DatasetError
from diffray.methods import validate_config
from diffray.trainers.dreambooth import preflight
from diffray.trainers.dreambooth.class_images import class_dir_for
from diffray.trainers.dreambooth.task import DreamBoothTask
from diffray.trainers.session import WorkerEnv

ENV = WorkerEnv(0, 1, torch.device("cpu"), "fp32")


def cfg_of(**sections):
    return validate_config({"method": "dreambooth", **sections})


def batch(comps, ids: list[int], prompt: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tok = comps.tokenizer([prompt] * len(ids), padding="max_length", max_length=77, return_tensors="pt").input_ids
    return {"sample_id": torch.tensor(ids), "pixel_values": torch.rand(len(ids), 3, 64, 64, generator=g) * 2 - 1,
            "input_ids": tok}


def test_prior_weight_zero_equals_instance_loss_and_weight_adds_class_loss(tiny_model_path):
    task = DreamBoothTask(cfg_of(dreambooth={"prior_loss_weight": 0.0}), tiny_model_path, ENV)
    model, comps = task.module, task.comps
    inst, klass = batch(comps, [0, 1], "a photo of sks widget", 1), batch(comps, [1_000_000, 1_000_001], "a photo of a widget", 2)
    with torch.no_grad():
        no_prior = task.losses(model, inst, 3).mean()
        with_zero = task.prior_loss(model, inst, klass, 3)
        class_only = task.losses(model, klass, 3).mean()
        weighted_task = DreamBoothTask(cfg_of(dreambooth={"prior_loss_weight": 0.5}), tiny_model_path, ENV)
        weighted = weighted_task.prior_loss(model, inst, klass, 3)
    assert torch.allclose(with_zero, no_prior, atol=1e-6), (with_zero, no_prior)
    assert torch.allclose(weighted, no_prior + 0.5 * class_only, atol=1e-6)
    assert class_only.item() > 0 and abs(class_only.item() - no_prior.item()) > 1e-4
    # The step's tally (what the instance_loss / class_loss / class_rows metrics report) splits the
    # rows by sample id: 2 instance rows with the instance loss, 2 class rows with the class loss.
    weighted_task.sums = torch.zeros(4, dtype=torch.float64)
    with torch.no_grad():
        weighted_task.prior_loss(model, inst, klass, 3)
    inst_sum, inst_n, cls_sum, cls_n = weighted_task.sums.tolist()
    assert (inst_n, cls_n) == (2, 2)
    assert abs(inst_sum / 2 - no_prior.item()) < 1e-6 and abs(cls_sum / 2 - class_only.item()) < 1e-6


def test_full_mode_trains_every_unet_weight_lora_mode_only_adapters(tiny_model_path):
    full = DreamBoothTask(cfg_of(dreambooth={"mode": "full"}), tiny_model_path, ENV).module
    assert all(p.requires_grad for p in full.unet.parameters()) and full.text_encoder is None
    full_te = DreamBoothTask(cfg_of(dreambooth={"mode": "full", "train_text_encoder": True}), tiny_model_path, ENV).module
    assert all(p.requires_grad for p in full_te.text_encoder.parameters())
    lora = DreamBoothTask(cfg_of(), tiny_model_path, ENV).module
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert names and all("lora" in n for n in names)


def test_text_encoder_flags_are_checked_against_mode():
    with pytest.raises(ConfigError, match="dreambooth.train_text_encoder"):
        cfg_of(dreambooth={"mode": "full"}, lora={"train_text_encoder": True})
    with pytest.raises(ConfigError, match="lora.train_text_encoder"):
        cfg_of(dreambooth={"train_text_encoder": True})
    with pytest.raises(ConfigError, match="prior_loss_weight"):
        cfg_of(dreambooth={"prior_loss_weight": -1})


def test_class_folder_key_changes_with_every_setting_that_changes_images(tmp_path):
    base = class_dir_for(cfg_of(), "/m")
    assert base == class_dir_for(cfg_of(), "/m")
    for other in (cfg_of(dreambooth={"class_prompt": "a photo of a gadget"}), cfg_of(data={"resolution": 32}),
                  cfg_of(dreambooth={"class_inference_steps": 7}), cfg_of(run={"seed": 1})):
        assert class_dir_for(other, "/m") != base
    assert class_dir_for(cfg_of(), "/other-model") != base
    assert class_dir_for(cfg_of(dreambooth={"class_data_dir": str(tmp_path)}), "/m") == str(tmp_path)
    assert class_dir_for(cfg_of(dreambooth={"class_data_dir": "s3://b/class/"}), "/m") == "s3://b/class/"
    on_s3 = class_dir_for(cfg_of(data={"cache": "s3://b/latents"}), "/m")  # no shared disk: beside the latent cache
    assert on_s3 == f"s3://b/latents/class-images/{base.rsplit('/', 1)[1]}"


def test_instance_folder_checks_run_before_any_work(tmp_path, tiny_model_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not an image")
    (bad / "b.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"2 of 2 cannot be used \(no valid images\).*a\.png"):
        preflight(cfg_of(data={"path": str(bad)}), tiny_model_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        preflight(cfg_of(data={"path": str(empty)}), tiny_model_path)
    good = tmp_path / "good"
    good.mkdir()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(good / "x.jpg")
    with pytest.raises(DatasetError, match="1 found, train.micro_batch_size needs 2"):
        preflight(cfg_of(data={"path": str(good)}, train={"micro_batch_size": 2}), tiny_model_path)
    preflight(cfg_of(data={"path": str(good)}, train={"micro_batch_size": 1}), tiny_model_path)
    with pytest.raises(DatasetError, match="not found"):
        preflight(cfg_of(data={"path": str(Path(tmp_path) / "missing")}), tiny_model_path)
