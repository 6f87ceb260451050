"""Untrained but non-trivial adapters for a base model, written with the project's own exporters: a LoRA
with random non-zero B, a Textual Inversion token with a random vector, and a ControlNet from the UNet.

For tests and benchmarks of serving, where the point is that an adapter changes the image, not what it
learned.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffray.models.adapters import add_lora, export_lora, write_card

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def random_lora(model_path: str, out_dir: str | Path, seed: int, rank: int = 4, std: float = 0.5,
                variant: str = "lora", text_encoder: bool = False) -> Path:
    """A LoRA (or `variant`) on the UNet attention projections (a Flux model's transformer's) with
    B ~ N(0, std) (so it changes the output); with `text_encoder`, one on the text encoder's q/v
    projections too."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    if (Path(model_path) / "transformer").is_dir():
        unet = FluxTransformer2DModel.from_pretrained(model_path, subfolder="transformer", use_safetensors=True)
    else:
        unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", use_safetensors=True)
    add_lora(unet, rank, float(rank), 0.0, TARGETS, seed, variant)
    models = [unet]
    if text_encoder:
        models.append(CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", use_safetensors=True))
        add_lora(models[1], rank, float(rank), 0.0, ["q_proj", "v_proj"], seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
    from diffray.models.family import family_of

    return export_lora(out_dir, unet, models[1] if text_encoder else None,
                       {"base_model": model_path, "method": "lora", "family": family_of(model_path).name,
                        "note": "random"})


def random_textual_inversion(model_path: str, out_dir: str | Path, token: str, seed: int,
                             std: float = 3.0) -> Path:
    """A one-vector Textual Inversion token with a random embedding (one per text encoder for SDXL:
    the clip_l/clip_g file)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from diffray.models.textual_inversion import add_placeholder_tokens, export_textual_inversion

    parts = [("tokenizer", "text_encoder", CLIPTextModel)]
    if (Path(model_path) / "text_encoder_2").is_dir():
        parts.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    gen = torch.Generator().manual_seed(seed)
    encoders, ids = [], []
    for tok_dir, te_dir, cls in parts:
        tok = CLIPTokenizer.from_pretrained(model_path, subfolder=tok_dir)
        te = cls.from_pretrained(model_path, subfolder=te_dir, use_safetensors=True)
        ids.append(add_placeholder_tokens(tok, te, token, "a", 1))
        with torch.no_grad():
            emb = te.get_input_embeddings().weight
            emb[ids[-1]] = torch.randn(len(ids[-1]), emb.shape[1], generator=gen) * std
        encoders.append(te)
    second = dict(text_encoder_2=encoders[1], token_ids_2=ids[1]) if len(encoders) == 2 else {}
    from diffray.models.family import family_of

    card = {"base_model": model_path, "method": "textual_inversion", "family": family_of(model_path).name,
            "note": "random", "placeholder_token": token}
    return export_textual_inversion(out_dir, encoders[0], ids[0], token, card, **second)


def controlnet_from_unet(model_path: str, out_dir: str | Path, seed: int) -> Path:
    """A ControlNet copying the UNet encoder, its zero convolutions perturbed: the output blocks (so it changes
    the image) and the conditioning embedding's last conv (so the control image itself matters)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", use_safetensors=True)
    torch.manual_seed(seed)
    cn = ControlNetModel.from_unet(unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():
            if any(k in name for k in ("zero_conv", "controlnet_down_blocks", "controlnet_mid_block",
                                       "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    out = Path(out_dir)
    cn.save_pretrained(out, safe_serialization=True)
    from diffray.models.family import family_of

    write_card(out, {"base_model": model_path, "method": "controlnet", "family": family_of(model_path).name,
                     "note": "random"})
    return out


class Probe:
    """A fixed UNet input (two latents, timesteps 50 and 600, two prompts' text conditioning from the
    model's family: states, plus pooled embedding and size ids for SDXL, T5 states and CLIP's pooled output
    for Flux) and a trained model's prediction
    for it: what an exported adapter loaded into a stock pipeline must reproduce (`error(unet)`)."""

    def __init__(self, model, comps, family=None):
        from diffray.models.family import StableDiffusion

        family = family or StableDiffusion()
        g = torch.Generator().manual_seed(1)
        self.latents, self.t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([50, 600])
        with torch.no_grad():
            self.text = family.conditioning(comps, family.tokenize(comps, ["a red circle", "x"]), {}, (64, 64))
            self.expected = model(self.latents, self.t, **self.text)

    def error(self, unet) -> float:
        """Largest |unet's prediction - the trained model's| on the probe."""
        from diffray.trainers.denoising import Denoiser

        with torch.no_grad():  # through our Denoiser: a Flux transformer takes packed latents
            pred = Denoiser(unet)(self.latents, self.t, **self.text)
        return (pred - self.expected).abs().max().item()
