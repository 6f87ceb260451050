"""LoRA on the tiny model without Ray: identity at init, export -> stock diffusers round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffray.generate import load_adapter
from diffray.models.adapters import CARD, LORA_WEIGHTS, export_lora, read_card
from diffray.models.loading import load_components
from diffray.trainers.denoising import lora_denoiser
from diffray.trainers.lora import LoraTrainConfig


def build_model(cfg, comps):
    return lora_denoiser(comps, cfg.lora, cfg.run.seed)


def _inputs(comps, seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    ids = comps.tokenizer(["a red circle", "a blue star"], padding="max_length", truncation=True,
                          max_length=comps.tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = comps.text_encoder(ids)[0]
    return latents, t, ids, hidden


def test_lora_at_init_equals_base(tiny_model_path):
    base = load_components(tiny_model_path)
    comps = load_components(tiny_model_path)
    latents, t, _, hidden = _inputs(base)
    with torch.no_grad():
        expected = base.unet(latents, t, encoder_hidden_states=hidden).sample
    model = build_model(LoraTrainConfig(), comps)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-2] for n in trainable} == {"lora_A", "lora_B"} or all("lora" in n for n in trainable)
    with torch.no_grad():
        got = model(latents, t, encoder_hidden_states=hidden)
    assert torch.equal(got, expected)


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_export_reproduces_trained_model_in_stock_diffusers(tiny_model_path, tmp_path, train_text_encoder):
    comps = load_components(tiny_model_path)
    cfg = LoraTrainConfig.model_validate({"lora": {"rank": 4, "alpha": 8, "train_text_encoder": train_text_encoder}})
    model = build_model(cfg, comps)
    _perturb(model)
    latents, t, ids, _ = _inputs(comps)
    with torch.no_grad():
        hidden = comps.text_encoder(ids)[0]
        trained = comps.unet(latents, t, encoder_hidden_states=hidden).sample
    out = export_lora(tmp_path / "adapter", comps.unet, model.text_encoder, {"method": "lora", "base_model": "builtin:tiny"})
    weights = load_file(str(out / LORA_WEIGHTS))
    assert weights and all(k.startswith(("unet.", "text_encoder.")) for k in weights)
    assert any(k.startswith("text_encoder.") for k in weights) == train_text_encoder
    assert read_card(out)["method"] == "lora" and (out / CARD).is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    base_img = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
    load_adapter(pipe, str(out))
    with torch.no_grad():
        hidden2 = pipe.text_encoder(ids)[0]
        got = pipe.unet(latents, t, encoder_hidden_states=hidden2).sample
    assert (got - trained).abs().max().item() < 1e-5
    lora_img = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
    assert abs(lora_img - base_img).max() > 1e-3, "the adapter must change the generated image"


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_caption_dropout_trains_on_the_empty_caption(tiny_model_path, train_text_encoder):
    from diffray.trainers.lora.task import LoraTask
    from diffray.trainers.session import WorkerEnv

    cfg = LoraTrainConfig.model_validate({"lora": {"train_text_encoder": train_text_encoder},
                                          "data": {"caption_dropout": 1.0}})
    task = LoraTask(cfg, tiny_model_path, WorkerEnv(0, 1, torch.device("cpu"), "fp32"))
    model = task.module
    _perturb(model)
    _, _, ids, _ = _inputs(task.comps)
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 2 - 1
    empty = task.empty_prompt()
    batch = {"sample_id": torch.tensor([0, 1]), "pixel_values": pixels, "input_ids": ids}
    with torch.no_grad():  # dropout=False: the same loss without caption dropout
        dropped = task.losses(model, batch, 1)
        blank = task.losses(model, {**batch, "input_ids": empty["input_ids"].repeat(2, 1)}, 1, dropout=False)
        captioned = task.losses(model, batch, 1, dropout=False)
    assert torch.allclose(dropped, blank, atol=1e-6) and not torch.allclose(dropped, captioned, atol=1e-4)
