"""`lora.variant` on the tiny model without Ray, one table over every variant: identity at init, a few
optimizer steps on the denoising loss move the loss and every adapter weight, and the exported artifact
reloads (diffusers' `load_lora_weights` for LoRA/DoRA/rsLoRA, PEFT for LoHa/LoKr) to the same UNet noise
prediction. Plus the config checks and the server's refusal of a PEFT adapter dir."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from diffray.config import validate_as
from diffray.errors import AdapterError, ConfigError
from diffray.generate import load_adapter
from diffray.models.adapters import LORA_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, export_lora, read_card
from diffray.models.loading import load_components
from diffray.trainers.denoising import lora_denoiser
from diffray.trainers.lora import LoraTrainConfig

# variant -> (artifact weights file, a key fragment its file must hold)
VARIANTS = {"lora": (LORA_WEIGHTS, "lora.down.weight"), "dora": (LORA_WEIGHTS, "lora_magnitude_vector"),
            "rslora": (LORA_WEIGHTS, "lora.down.weight"), "loha": (PEFT_WEIGHTS, "hada_w2_b"),
            "lokr": (PEFT_WEIGHTS, "lokr_w2")}


def _batch(comps):
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ids = comps.tokenizer(["a red circle", "a blue star"], padding="max_length", return_tensors="pt",
                          max_length=comps.tokenizer.model_max_length).input_ids
    with torch.no_grad():
        hidden = comps.text_encoder(ids)[0]
    return latents, noise, torch.tensor([10, 700]), hidden


def _train(model, batch, steps=3):
    """AdamW steps on the plain denoising (epsilon) loss; the losses seen."""
    latents, noise, t, hidden = batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(latents, t, encoder_hidden_states=hidden), noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains_exports_and_reloads_to_the_same_prediction(tiny_model_path, tmp_path, variant):
    comps = load_components(tiny_model_path)
    batch = _batch(comps)
    latents, _, t, hidden = batch
    with torch.no_grad():
        base = comps.unet(latents, t, encoder_hidden_states=hidden).sample
    cfg = LoraTrainConfig.model_validate({"lora": {"variant": variant, "rank": 4, "alpha": 8}})
    model = lora_denoiser(comps, cfg.lora, cfg.run.seed)
    with torch.no_grad():
        assert torch.equal(model(latents, t, encoder_hidden_states=hidden), base), "identity at init"
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = _train(model, batch)
    assert losses[-1] < losses[0]
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])}
    assert moved == set(trainable)
    with torch.no_grad():
        trained = model(latents, t, encoder_hidden_states=hidden)
    assert (trained - base).abs().max() > 1e-3

    out = export_lora(tmp_path / variant, comps.unet, None, {"method": "lora", "base_model": tiny_model_path})
    file, fragment = VARIANTS[variant]
    assert {p.name for p in out.iterdir()} >= {file} and read_card(out)["adapter_variant"] == variant
    assert any(fragment in k for k in load_file(str(out / file)))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    load_adapter(pipe, str(out))
    with torch.no_grad():
        got = pipe.unet(latents, t, encoder_hidden_states=hidden).sample
    assert torch.allclose(got, trained, atol=1e-4), (got - trained).abs().max()


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_peft_dir_loads_with_stock_peft_model(tiny_model_path, tmp_path, variant):
    """The LoHa/LoKr dir is PEFT's own layout: `PeftModel.from_pretrained(unet, dir)` reproduces it."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    comps = load_components(tiny_model_path)
    batch = _batch(comps)
    latents, _, t, hidden = batch
    model = lora_denoiser(comps, LoraTrainConfig.model_validate({"lora": {"variant": variant}}).lora, 0)
    _train(model, batch, steps=2)
    with torch.no_grad():
        trained = model(latents, t, encoder_hidden_states=hidden)
    out = export_lora(tmp_path / variant, comps.unet, None, {"method": "lora"})
    assert (out / PEFT_CONFIG).is_file() and not (out / LORA_WEIGHTS).exists()
    unet = UNet2DConditionModel.from_pretrained(tiny_model_path, subfolder="unet", use_safetensors=True)
    peft_unet = PeftModel.from_pretrained(unet, str(out))
    with torch.no_grad():
        got = peft_unet(latents, t, encoder_hidden_states=hidden).sample
    assert torch.allclose(got, trained, atol=1e-4), (got - trained).abs().max()


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_text_encoder_training_needs_a_diffusers_variant(variant):
    with pytest.raises(ConfigError, match="lora.train_text_encoder needs lora.variant lora, dora or rslora"):
        validate_as(LoraTrainConfig, {"lora": {"variant": variant, "train_text_encoder": True}})


def test_unknown_variant_names_the_field_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"lora\.variant.*'lora', 'dora', 'rslora', 'loha' or 'lokr'"):
        validate_as(LoraTrainConfig, {"lora": {"variant": "ia3"}})


def test_server_refuses_a_peft_adapter_dir_by_name(tiny_model_path, tmp_path):
    from diffray.serve.registry import AdapterRegistry

    comps = load_components(tiny_model_path)
    lora_denoiser(comps, LoraTrainConfig.model_validate({"lora": {"variant": "lokr"}}).lora, 0)
    export_lora(tmp_path / "my-lokr", comps.unet, None, {"method": "lora"})
    with pytest.raises(AdapterError, match="a PEFT adapter dir .*LoHa or LoKr.*serves LoRA, DoRA and rsLoRA"):
        AdapterRegistry(tmp_path).get("my-lokr")


def _random_adapter(model_path: str, out, variant: str, seed: int):
    """An untrained `variant` adapter whose zero-initialised factors are perturbed, so it changes the image."""
    from diffusers import UNet2DConditionModel

    from diffray.models.adapters import add_lora

    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", use_safetensors=True)
    add_lora(unet, 4, 4.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], seed, variant)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.requires_grad and ("lora_B" in name or "lokr_w2" in name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return export_lora(out, unet, None, {"method": "lora", "base_model": model_path})


def test_served_dora_and_rslora_mix_with_a_lora_and_lokr_is_refused(tiny_model_path, tmp_path):
    """ImageEngine (no Ray): DoRA and rsLoRA adapters load beside a LoRA, each changes the image, mixes
    differ from each alone, unloading gives the base image back; a LoKr is refused by name."""
    from testkit.adapters import random_lora

    from diffray.serve.config import parse_args
    from diffray.serve.engine import ImageEngine
    from diffray.serve.schemas import Job

    random_lora(tiny_model_path, tmp_path / "plain", seed=1)
    for variant, seed in (("dora", 2), ("rslora", 3), ("lokr", 4)):
        _random_adapter(tiny_model_path, tmp_path / variant, variant, seed)
    engine = ImageEngine(parse_args({"model": tiny_model_path, "adapters_dir": str(tmp_path)}), device="cpu")

    def image(*adapters):
        return engine.run([Job(prompt="a red circle", n=1, width=64, height=64, steps=2, guidance=7.5, seed=5,
                               adapters=adapters)])[0][0]

    base = image()
    engine.acquire(["plain", "dora", "rslora"])
    sets = [(("plain", 1.0),), (("dora", 1.0),), (("rslora", 1.0),), (("plain", 1.0), ("dora", 0.5)),
            (("dora", 1.0), ("rslora", 1.0))]
    images = [image(*s) for s in sets]
    assert len(set(images + [base])) == len(sets) + 1
    engine.release(["plain", "dora", "rslora"])
    assert image() == base
    with pytest.raises(AdapterError, match="'lokr' is unavailable: a PEFT adapter dir"):
        engine.acquire(["lokr"])
