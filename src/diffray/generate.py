"""Image generation with a stock diffusers pipeline plus an optional adapter: LoRA or Textual Inversion (no Ray)."""

from __future__ import annotations

from pathlib import Path

import torch

from diffray.errors import AdapterError
from diffray.images import make_grid
from diffray.models.adapters import LORA_WEIGHTS, read_card
from diffray.models.textual_inversion import TI_WEIGHTS, load_textual_inversion


def load_adapter(pipe, adapter_dir: str, adapter_name: str = "default"):
    """Load a diffray adapter dir (safetensors only) by what it holds: a LoRA (`pipe.load_lora_weights`)
    or Textual Inversion embeddings (`pipe.load_textual_inversion`; prompts must use its token)."""
    d = Path(adapter_dir)
    if (d / TI_WEIGHTS).is_file():
        return load_textual_inversion(pipe, d)
    if not (d / LORA_WEIGHTS).is_file():
        raise AdapterError(f"{d}: no {LORA_WEIGHTS} (is this a LoRA adapter dir?)")
    try:
        pipe.load_lora_weights(str(d), weight_name=LORA_WEIGHTS, adapter_name=adapter_name, use_safetensors=True)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise AdapterError(f"{d}: cannot load LoRA into this base model: {exc}") from None
    return pipe


def render(pipe, prompts: list[str], seed: int, num_images: int, steps: int, guidance: float,
           lora_scale: float | None = None) -> list[list]:
    """One row of `num_images` PIL images per prompt; image j uses seed + j."""
    extra = {"cross_attention_kwargs": {"scale": lora_scale}} if lora_scale is not None else {}
    rows = []
    for p in prompts:
        gens = [torch.Generator().manual_seed(seed + j) for j in range(num_images)]
        out = pipe([p] * num_images, num_inference_steps=steps, guidance_scale=guidance, generator=gens, **extra)
        rows.append(out.images)
    return rows


def generate_grid(prompts: list[str], adapter: str | None, model: str | None, out: Path, seed: int = 0,
                  num_images: int = 1, steps: int = 20, guidance: float = 7.5, lora_scale: float = 1.0,
                  compare_base: bool = False) -> Path:
    """Render prompts (base rows first when `compare_base`) and save one labelled grid PNG."""
    from diffray.models.loading import load_pipeline, resolve_model_path

    base = model or (read_card(adapter).get("base_model") if adapter else None) or "builtin:tiny"
    pipe = load_pipeline(resolve_model_path(base))
    pipe.set_progress_bar_config(disable=True)
    rows, labels = [], []
    if compare_base or adapter is None:
        rows += render(pipe, prompts, seed, num_images, steps, guidance)
        labels += ["base"] * len(prompts)
    if adapter is not None:
        load_adapter(pipe, adapter)
        rows += render(pipe, prompts, seed, num_images, steps, guidance, lora_scale)
        labels += [read_card(adapter).get("method", "adapter")] * len(prompts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(rows, labels).save(out)
    return out
