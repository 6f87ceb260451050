"""Resolve a model reference (builtin:, local dir, hub id) and load pipeline components from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from diffray.errors import ModelError
from diffray.paths import BUILTIN_PREFIX, cache_dir, is_builtin


def quiet_hf() -> None:
    """Silence per-file progress bars of diffusers/transformers loads (our own bars stay)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


@dataclass
class SDComponents:
    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any


def resolve_model_path(path: str) -> str:
    """`builtin:<preset>[?seed=N]` -> a cached dir built on first use; a local dir is checked;
    anything else is passed through as a hub id."""
    if is_builtin(path):
        from diffray.models.tiny import PRESETS, build_pipeline_dir

        spec = path[len(BUILTIN_PREFIX):]
        preset, _, query = spec.partition("?")
        seed = int(query.split("=", 1)[1]) if query.startswith("seed=") else 0
        if preset not in PRESETS:
            raise ModelError(f"unknown builtin model {path!r} (allowed: {', '.join('builtin:' + p for p in PRESETS)})")
        target = cache_dir() / "models" / f"{preset}-seed{seed}"
        with FileLock(str(target) + ".lock"):
            if not (target / "model_index.json").is_file():
                build_pipeline_dir(target, preset=preset, seed=seed)
        return str(target)
    p = Path(path).expanduser()
    if p.exists() or path.startswith((".", "/", "~")):
        if not (p / "model_index.json").is_file():
            raise ModelError(f"{p}: not a diffusers model dir (no model_index.json)")
        return str(p.resolve())
    return path  # a hub id: from_pretrained resolves it where the cluster has network access


def _load(cls, path: str, subfolder: str, **kwargs):
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelError(f"{path}: cannot load {subfolder}: {str(exc).splitlines()[0]}") from None


def load_components(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> SDComponents:
    """Tokenizer, text encoder, VAE, UNet and the training noise scheduler (DDPM) from a diffusers dir."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    quiet_hf()
    return SDComponents(
        tokenizer=_load(CLIPTokenizer, path, "tokenizer"),
        text_encoder=_load(CLIPTextModel, path, "text_encoder", use_safetensors=True).to(device, dtype),
        vae=_load(AutoencoderKL, path, "vae", use_safetensors=True).to(device, dtype),
        unet=_load(UNet2DConditionModel, path, "unet", use_safetensors=True).to(device, dtype),
        noise_scheduler=_load(DDPMScheduler, path, "scheduler"),
    )


def load_pipeline(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A stock `StableDiffusionPipeline` (no safety checker) from a diffusers dir or hub id."""
    from diffusers import StableDiffusionPipeline

    quiet_hf()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(path, dtype=dtype, safety_checker=None,
                                                       use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot load pipeline: {str(exc).splitlines()[0]}") from None
    return pipe.to(device)
