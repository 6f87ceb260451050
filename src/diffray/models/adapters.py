"""Adapters: add LoRA to UNet / text encoder with PEFT, export in diffusers format, write model cards.

Exports use diffusers/PEFT's own functions so stock `pipe.load_lora_weights(dir)` reads them; files are
safetensors only. Never imports ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CARD = "diffray_card.json"


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: list[str],
             seed: int) -> LoraConfig:
    """Freeze `model` and inject a trainable LoRA adapter ("default"); B starts at zero so the
    adapted model equals the base model until the first update."""
    model.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                        target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # same A on every rank and every rerun
        model.add_adapter(config)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"no module of {type(model).__name__} matched LoRA targets {targets}")
    return config


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in diffusers naming, on CPU; in PEFT naming (lora_A/lora_B, which
    `load_lora_weights` also reads) when some targets have no diffusers name (e.g. conv layers): diffusers
    renames only attention projections, and a file mixing both namings loads only half of its layers."""
    from diffusers.utils import convert_state_dict_to_diffusers

    peft_sd = get_peft_model_state_dict(model)
    sd = convert_state_dict_to_diffusers(dict(peft_sd))
    if any(".lora_A." in k or ".lora_B." in k for k in sd):
        sd = peft_sd
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}


def export_lora(out_dir: str | Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None,
                card: dict[str, Any]) -> Path:
    """Write `pytorch_lora_weights.safetensors` (+ adapter metadata) and a JSON card into out_dir."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = lora_state_dict(text_encoder)
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=lora_state_dict(unet),
                                              safe_serialization=True, **kwargs)
    write_card(out, card)
    return out


def write_card(out_dir: str | Path, card: dict[str, Any]) -> Path:
    """A JSON model card: base model, method, config, steps, metrics, creation time."""
    path = Path(out_dir) / CARD
    path.write_text(json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **card},
                               indent=2, default=str))
    return path


def read_card(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / CARD
    return json.loads(path.read_text()) if path.is_file() else {}
