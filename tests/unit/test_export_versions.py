"""Which Stable Diffusion version a kohya export says its LoRA is for. Training records the base model's text
encoder and prediction type in the card (`base_model_config`); the export turns them into sd-scripts' `ss_v2`
(what A1111 picks an SD 2.x base by), `ss_base_model_version` (sd_v1 / sd_v2, `_v` for v-prediction) and the
ModelSpec architecture (stable-diffusion-v1, -v2-512, -v2-768-v). An SD 2.x LoRA was labelled SD 1.x. Cards
written before the field existed still export as SD 1.x. No Ray."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from diffray.errors import ModelError
from diffray.models import lora_formats
from diffray.models.family import base_model_config, version_fields
from diffray.models.loading import load_components
from diffray.trainers.denoising import export_lora_artifact, lora_denoiser
from diffray.trainers.lora import LoraTrainConfig
from diffray.trainers.session import card

LORA = {"rank": 4, "alpha": 8, "train_text_encoder": True}


def _base(tiny_model_path, folder, hidden_act: str, prediction_type: str):
    """The tiny SD pipeline with its text encoder's activation and its scheduler's prediction type set: SD 2.x's
    OpenCLIP ViT-H runs exact gelu (CLIP ViT-L, SD 1.x: quick_gelu); SD 2.x 768-v predicts v."""
    base = shutil.copytree(tiny_model_path, folder)
    for name, key, value in (("text_encoder/config.json", "hidden_act", hidden_act),
                             ("scheduler/scheduler_config.json", "prediction_type", prediction_type)):
        config = json.loads((base / name).read_text())
        (base / name).write_text(json.dumps({**config, key: value}))
    return base


def _predict(unet, text_encoder, tokenizer):
    g = torch.Generator().manual_seed(0)
    ids = tokenizer(["a red circle"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]),
                    encoder_hidden_states=text_encoder(ids)[0]).sample


def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("hidden_act,prediction,want", [
    ("quick_gelu", "epsilon", ("False", "sd_v1", "stable-diffusion-v1/lora", "epsilon")),  # the tiny model: SD 1.x
    ("gelu", "epsilon", ("True", "sd_v2", "stable-diffusion-v2-512/lora", "epsilon")),
    ("gelu", "v_prediction", ("True", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "v")),
])
def test_a_trained_loras_kohya_file_names_its_sd_version_and_loads_in_stock_diffusers(hidden_act, prediction, want,
                                                                                       tiny_model_path, tmp_path):
    base = _base(tiny_model_path, tmp_path / "base", hidden_act, prediction)
    cfg = LoraTrainConfig.model_validate({"run": {"name": "ver"}, "model": {"path": str(base)}, "lora": LORA})
    comps = load_components(str(base))
    module = lora_denoiser(comps, cfg.lora, cfg.run.seed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    trained = _predict(comps.unet, comps.text_encoder, comps.tokenizer)

    artifact = export_lora_artifact(module, tmp_path / "artifact", card(cfg, str(base), {"step": 3}, {}), ["kohya"])
    recorded = json.loads((artifact / "diffray_card.json").read_text())["base_model_config"]
    assert recorded == {"text_encoder": {"hidden_act": hidden_act, "hidden_size": 32}, "prediction_type": prediction}
    meta = _metadata(artifact / "kohya" / "ver.safetensors")
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["modelspec.architecture"],
            meta["modelspec.prediction_type"]) == want
    assert meta["modelspec.resolution"] == "64x64"  # the training resolution, whatever the version

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    pipe.load_lora_weights(str(artifact / "kohya"), weight_name="ver.safetensors")
    assert (_predict(pipe.unet, pipe.text_encoder, pipe.tokenizer) - trained).abs().max().item() < 1e-4


def _weights():
    return {"unet.blocks.0.to_q": lora_formats.LoraLayer(torch.ones(2, 8), torch.ones(8, 2), 2.0)}


V2 = {"text_encoder": {"hidden_act": "gelu", "hidden_size": 1024}, "prediction_type": "epsilon"}
V2_V = {**V2, "prediction_type": "v_prediction"}


@pytest.mark.parametrize("extra,want", [
    ({}, ("False", "sd_v1", "stable-diffusion-v1/lora", "512x512")),  # a card from before: SD 1.x, as it was
    ({"base_model_config": "gelu"}, ("False", "sd_v1", "stable-diffusion-v1/lora", "512x512")),  # not an object
    ({"base_model_config": {"text_encoder": ["gelu"]}}, ("False", "sd_v1", "stable-diffusion-v1/lora", "512x512")),
    ({"base_model_config": {**V2, "text_encoder": {"hidden_act": "quick_gelu", "hidden_size": 768}}},
     ("False", "sd_v1", "stable-diffusion-v1/lora", "512x512")),
    ({"base_model_config": V2}, ("True", "sd_v2", "stable-diffusion-v2-512/lora", "512x512")),
    ({"base_model_config": V2_V}, ("True", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "768x768")),
    # the prediction type the LoRA trained with (model.prediction_type) wins over the base scheduler's
    ({"base_model_config": V2, "config": {"model": {"prediction_type": "v_prediction"}}},
     ("True", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "768x768")),
    ({"base_model_config": V2_V, "config": {"model": {"prediction_type": "epsilon"}}},
     ("True", "sd_v2", "stable-diffusion-v2-512/lora", "512x512")),
    ({"family": "stable-diffusion-xl", "base_model_config": V2_V},
     ("False", "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "1024x1024")),
])
def test_kohya_metadata_of_a_card_says_v2_only_when_it_records_sd2s_text_encoder(extra, want):
    meta = lora_formats.kohya_metadata(_weights(), {"family": "stable-diffusion", **extra})
    assert (meta["ss_v2"], meta["ss_base_model_version"], meta["modelspec.architecture"],
            meta["modelspec.resolution"]) == want


def test_base_model_config_reads_the_models_own_configs(tiny_model_path, tmp_path, caplog):
    assert base_model_config(tiny_model_path) == {"text_encoder": {"hidden_act": "quick_gelu", "hidden_size": 32},
                                                  "prediction_type": "epsilon"}
    base = shutil.copytree(tiny_model_path, tmp_path / "base")
    for name, key in (("text_encoder/config.json", "hidden_act"), ("scheduler/scheduler_config.json",
                                                                   "prediction_type")):
        config = json.loads((base / name).read_text())
        del config[key]
        (base / name).write_text(json.dumps(config))
    # a field the file leaves out is the library's default, which the model runs with
    assert base_model_config(str(base)) == {"text_encoder": {"hidden_act": "quick_gelu", "hidden_size": 32},
                                            "prediction_type": "epsilon"}
    shutil.rmtree(base / "text_encoder")
    with pytest.raises(ModelError, match="cannot read its configs"):
        base_model_config(str(base))
    with caplog.at_level(logging.WARNING, logger="diffray.models.family"):
        assert version_fields("stable-diffusion", str(base)) == {}  # unreadable: the artifact is still written
    assert "kohya export says SD 1.x" in caplog.text
    assert version_fields("stable-diffusion-xl", tiny_model_path) == {}
    assert version_fields("stable-diffusion", tiny_model_path) == {"base_model_config": base_model_config(
        tiny_model_path)}
