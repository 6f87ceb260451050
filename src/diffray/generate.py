"""Image generation with a stock diffusers pipeline plus optional adapters: LoRA or Textual Inversion, and
one or more ControlNets with their control images (no Ray)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffray.errors import AdapterError, ConfigError
from diffray.images import make_grid
from diffray.models.flux import call_args
from diffray.models.adapters import LORA_WEIGHTS, PEFT_WEIGHTS, load_peft_adapter, read_card
from diffray.models.textual_inversion import TI_WEIGHTS, load_textual_inversion


def load_adapter(pipe, adapter_dir: str, adapter_name: str = "default"):
    """Load a diffray adapter dir (safetensors only) by what it holds: a LoRA, DoRA or rsLoRA
    (`pipe.load_lora_weights`), a LoHa or LoKr PEFT adapter dir (PEFT, into the UNet) or Textual Inversion
    embeddings (`pipe.load_textual_inversion`; prompts must use its token)."""
    d = Path(adapter_dir)
    if (d / TI_WEIGHTS).is_file():
        return load_textual_inversion(pipe, d)
    if (d / PEFT_WEIGHTS).is_file() and not (d / LORA_WEIGHTS).is_file():
        try:
            load_peft_adapter(pipe.unet, d, adapter_name)
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise AdapterError(f"{d}: cannot load the PEFT adapter into this base model: {exc}") from None
        return pipe
    if not (d / LORA_WEIGHTS).is_file():
        raise AdapterError(f"{d}: no {LORA_WEIGHTS} or {PEFT_WEIGHTS} (is this a LoRA adapter dir?)")
    try:
        pipe.load_lora_weights(str(d), weight_name=LORA_WEIGHTS, adapter_name=adapter_name, use_safetensors=True)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise AdapterError(f"{d}: cannot load LoRA into this base model: {exc}") from None
    return pipe


def check_controls(controlnets: list[str], control_images: list[str], scales: list[float]) -> list[float]:
    """The per-ControlNet scales; ConfigError when the counts do not match (checked before any loading)."""
    if control_images and not controlnets:
        raise ConfigError("--control-image needs --controlnet")
    if len(control_images) != len(controlnets):
        raise ConfigError(f"{len(controlnets)} --controlnet but {len(control_images)} --control-image; give one "
                          "control image per ControlNet, in the same order")
    scales = list(scales) or [1.0]
    if len(scales) == 1:
        scales = scales * len(controlnets)
    if len(scales) != len(controlnets):
        raise ConfigError(f"{len(scales)} --control-scale for {len(controlnets)} --controlnet (give one, or one each)")
    return scales


def controlnet_pipeline(pipe, controlnets: list[str], control_images: list[str], scales: list[float]):
    """The base pipeline as a `StableDiffusionControlNetPipeline` (`StableDiffusionXLControlNetPipeline` for
    an SDXL base; a MultiControlNet for several) and the
    call arguments (image, controlnet_conditioning_scale) for its control images; `scales` as
    `check_controls` returns them (one per ControlNet).

    Control images decode like training's: EXIF applied, grayscale to RGB, alpha on black.

    Raises:
        ConfigError: a control image cannot be read.
    """
    from diffusers import (StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline,
                           StableDiffusionXLPipeline)

    from diffray.data.transforms import BLACK, decode_image
    from diffray.errors import DatasetError
    from diffray.models.loading import load_controlnet

    models = [load_controlnet(d) for d in controlnets]
    images = []
    for p in control_images:
        try:
            images.append(decode_image(Path(p).read_bytes(), p, background=BLACK))
        except (OSError, DatasetError) as exc:
            raise ConfigError(f"control image {p}: {exc}") from None
    cls = StableDiffusionXLControlNetPipeline if isinstance(pipe, StableDiffusionXLPipeline) else \
        StableDiffusionControlNetPipeline
    cn_pipe = cls.from_pipe(pipe, controlnet=models[0] if len(models) == 1 else models)
    if len(models) == 1:
        return cn_pipe, {"image": images[0], "controlnet_conditioning_scale": scales[0]}
    return cn_pipe, {"image": images, "controlnet_conditioning_scale": scales}


def render(pipe, prompts: list[str], seed: int, num_images: int, steps: int, guidance: float,
           lora_scale: float | None = None, extra: dict | None = None) -> list[list]:
    """One row of `num_images` PIL images per prompt; image j uses seed + j. `extra`: more pipeline
    arguments (control images and scales)."""
    extra = {**call_args(pipe), **(extra or {})}
    if lora_scale is not None:  # Flux's transformer takes the LoRA scale as joint_attention_kwargs
        key = "joint_attention_kwargs" if type(pipe).__name__ == "FluxPipeline" else "cross_attention_kwargs"
        extra[key] = {"scale": lora_scale}
    rows = []
    for p in prompts:
        gens = [torch.Generator().manual_seed(seed + j) for j in range(num_images)]
        out = pipe([p] * num_images, num_inference_steps=steps, guidance_scale=guidance, generator=gens, **extra)
        rows.append(out.images)
    return rows


def generate_grid(prompts: list[str], adapter: str | None, model: str | None, out: Path, seed: int = 0,
                  num_images: int = 1, steps: int = 20, guidance: float | None = None, lora_scale: float = 1.0,
                  compare_base: bool = False, controlnets: list[str] | None = None,
                  control_images: list[str] | None = None, control_scales: list[float] | None = None) -> Path:
    """Render prompts (base rows first when `compare_base`) and save one labelled grid PNG.

    `guidance` None is the model family's default (7.5; 3.5 for Flux). With `controlnets` every image is
    controlled by their `control_images` (one each) at `control_scales`; the base rows are then the same
    pipeline at control scale 0 (no control)."""
    from diffray.models.loading import load_pipeline, resolve_model_path

    controlnets = list(controlnets or [])
    scales = check_controls(controlnets, list(control_images or []), list(control_scales or []))
    cards = [read_card(d) for d in ([adapter] if adapter else []) + controlnets]
    base = model or next((c["base_model"] for c in cards if c.get("base_model")), None) or "builtin:tiny"
    base_path = resolve_model_path(base)
    pipe = load_pipeline(base_path)
    if guidance is None:  # the family's: classifier-free 7.5 for SD/SDXL, Flux's distilled 3.5
        from diffray.models.family import family_of

        guidance = family_of(base_path).default_guidance
    extra, off = {}, {}
    if controlnets:
        pipe, extra = controlnet_pipeline(pipe, controlnets, list(control_images or []), scales)
        off = {**extra, "controlnet_conditioning_scale": [0.0] * len(controlnets) if len(controlnets) > 1 else 0.0}
    pipe.set_progress_bar_config(disable=True)
    rows, labels = [], []
    if compare_base or (adapter is None and not controlnets):
        rows += render(pipe, prompts, seed, num_images, steps, guidance, extra=off)
        labels += ["base"] * len(prompts)
    if adapter is not None:
        load_adapter(pipe, adapter)
    if adapter is not None or controlnets:
        rows += render(pipe, prompts, seed, num_images, steps, guidance, lora_scale if adapter else None, extra)
        names = (([read_card(adapter).get("method", "adapter")] if adapter else [])
                 + (["controlnet"] if controlnets else []))
        labels += ["+".join(names)] * len(prompts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, labels).save(out)
    return out
