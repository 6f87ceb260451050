"""Adapters: add LoRA (or a PEFT variant: DoRA, rsLoRA, LoHa, LoKr) to UNet / text encoder, export it in
the format that loads it, write model cards.

LoRA, DoRA and rsLoRA export in diffusers format (stock `pipe.load_lora_weights(dir)` reads them, the
PEFT config rides along as metadata so DoRA's magnitudes and rsLoRA's scaling survive); LoHa and LoKr,
which diffusers' LoRA loader cannot read, export as a PEFT adapter dir (`adapter_config.json` +
`adapter_model.safetensors`, what `peft.PeftModel.from_pretrained` reads). Files are safetensors only.
Never imports ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig
from peft.utils import get_peft_model_state_dict

from diffray.models.export_io import CARD, read_card_file, without_credentials

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"  # PEFT's save_pretrained names: LoHa / LoKr artifacts
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained prefixes keys; from_pretrained expects it
VARIANTS = ("lora", "dora", "rslora", "loha", "lokr")
PEFT_DIR_VARIANTS = ("loha", "lokr")  # no diffusers LoRA layout: exported as a PEFT adapter dir


def adapter_config(variant: str, rank: int, alpha: float, dropout: float, targets: list[str]) -> PeftConfig:
    """The PEFT config of `variant`, each initialised so the adapted model equals the base at step 0.
    LoHa/LoKr have no input dropout: `dropout` becomes their rank dropout."""
    if variant in PEFT_DIR_VARIANTS:
        kind = LoHaConfig if variant == "loha" else LoKrConfig
        return kind(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=targets, init_weights=True)
    if variant not in VARIANTS:
        raise ValueError(f"unknown adapter variant {variant!r}; one of {', '.join(VARIANTS)}")
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                      target_modules=targets, use_dora=variant == "dora", use_rslora=variant == "rslora")


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float, targets: list[str],
             seed: int, variant: str = "lora") -> PeftConfig:
    """Freeze `model` and inject a trainable adapter ("default") of `variant`; it starts as the identity
    (LoRA's B, LoHa's and LoKr's second factor at zero) so the adapted model equals the base model until
    the first update."""
    model.requires_grad_(False)
    config = adapter_config(variant, rank, alpha, dropout, targets)
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
                card: dict[str, Any], text_encoder_2: torch.nn.Module | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` (+ adapter metadata) and a JSON card into out_dir; a LoHa or
    LoKr adapter goes to `export_peft_adapter` instead (its card says the variant either way). With SDXL's
    second text encoder, its layers are `text_encoder_2.` keys (`StableDiffusionXLPipeline`'s layout); a Flux
    transformer's are `transformer.` keys (`FluxPipeline`'s)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    variant = variant_of(unet.peft_config["default"])
    if variant in PEFT_DIR_VARIANTS:
        if text_encoder is not None:
            raise ValueError(f"a {variant} adapter exports the UNet only (no text-encoder layout)")
        return export_peft_adapter(out_dir, unet, {**card, "adapter_variant": variant})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = {**card, "adapter_variant": variant}
    if type(unet).__name__ == "FluxTransformer2DModel":  # diffusers' Flux layout: `transformer.` keys
        from diffusers import FluxPipeline

        FluxPipeline.save_lora_weights(out, transformer_lora_layers=lora_state_dict(unet), safe_serialization=True,
                                       transformer_lora_adapter_metadata=unet.peft_config["default"].to_dict())
        write_card(out, card)
        return out
    kwargs: dict[str, Any] = {"unet_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
    if text_encoder is not None:
        kwargs["text_encoder_lora_layers"] = lora_state_dict(text_encoder)
        kwargs["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    pipeline = StableDiffusionPipeline
    if text_encoder_2 is not None:
        pipeline = StableDiffusionXLPipeline
        kwargs["text_encoder_2_lora_layers"] = lora_state_dict(text_encoder_2)
        kwargs["text_encoder_2_lora_adapter_metadata"] = text_encoder_2.peft_config["default"].to_dict()
    pipeline.save_lora_weights(out, unet_lora_layers=lora_state_dict(unet), safe_serialization=True, **kwargs)
    write_card(out, card)
    return out


def variant_of(config: PeftConfig) -> str:
    """The `lora.variant` name of an injected adapter's PEFT config."""
    if isinstance(config, (LoHaConfig, LoKrConfig)):
        return "loha" if isinstance(config, LoHaConfig) else "lokr"
    return "dora" if config.use_dora else "rslora" if config.use_rslora else "lora"


def export_peft_adapter(out_dir: str | Path, model: torch.nn.Module, card: dict[str, Any]) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` in PEFT's own layout (keys prefixed as
    `PeftModel.save_pretrained` writes them) and the card into out_dir."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {PEFT_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
          for k, v in get_peft_model_state_dict(model).items()}
    save_file(sd, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    config = model.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in to_dict: not JSON
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    write_card(out, card)
    return out


def load_peft_adapter(model: torch.nn.Module, adapter_dir: str | Path, adapter_name: str = "default") -> None:
    """Inject the PEFT adapter stored in `adapter_dir` (LoHa/LoKr, as `export_peft_adapter` writes it) into
    `model` and load its weights; ValueError when a stored weight finds no layer to go to."""
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    config = PeftConfig.from_pretrained(str(d))
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(d / PEFT_WEIGHTS)).items()}
    inject_adapter_in_model(config, model, adapter_name)
    result = set_peft_model_state_dict(model, sd, adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"{len(result.unexpected_keys)} weights match no layer of this model, e.g. "
                         f"{result.unexpected_keys[0]}")


def write_card(out_dir: str | Path, card: dict[str, Any]) -> Path:
    """A JSON model card: base model, method, config, steps, metrics, creation time. It never holds credentials
    (`export_io.without_credentials`); local paths stay, as the project reads them back (generate, reward)."""
    path = Path(out_dir) / CARD
    card = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **card}
    card = without_credentials(json.loads(json.dumps(card, default=str)))  # every value as JSON will hold it
    path.write_text(json.dumps(card, indent=2))
    return path


def read_card(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's card ({} when it has none); AdapterError naming the file when it is not a JSON object."""
    return read_card_file(Path(adapter_dir) / CARD)
