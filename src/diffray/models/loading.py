"""Resolve a model reference (`builtin:`, local dir, hub id) and load Stable Diffusion components from it.

Loads are safetensors-only and every load failure becomes a `ModelError` naming the path. Never imports
ray, and never downloads weights by itself: a hub id is passed through to `from_pretrained` unchanged
(`native_size` reads a hub model's config files through huggingface_hub's cache, as `from_pretrained` does).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from diffray.errors import ModelError
from diffray.logs import quiet_hf
from diffray.paths import BUILTIN_PREFIX, cache_dir, is_builtin, looks_like_hub_id, pipeline_class_of

log = logging.getLogger(__name__)
FALLBACK_SIZE = 512

LOAD_ERRORS = (OSError, ValueError)  # what from_pretrained raises for missing or malformed files


@dataclass
class SDComponents:
    """The pieces a trainer needs; `noise_scheduler` is the training (DDPM) scheduler. SDXL-layout models
    also have `tokenizer_2` and `text_encoder_2` (a CLIP encoder with projection)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    tokenizer_2: Any = None
    text_encoder_2: Any = None


def parse_builtin(ref: str) -> tuple[str, int]:
    """`builtin:<preset>[?seed=N]` -> (preset, seed). Raises `ModelError` for a bad preset or query."""
    from diffray.models.tiny import PRESETS

    preset, _, query = ref[len(BUILTIN_PREFIX):].partition("?")
    if preset not in PRESETS:
        allowed = ", ".join(BUILTIN_PREFIX + p for p in PRESETS)
        raise ModelError(f"unknown builtin model {ref!r} (allowed: {allowed})")
    if not query:
        return preset, 0
    key, _, value = query.partition("=")
    if key != "seed" or not value.isdigit():
        raise ModelError(f"{ref!r}: the only option is '?seed=<non-negative int>'")
    return preset, int(value)


def _build_cached(preset: str, seed: int) -> Path:
    """The cached dir of a builtin preset, built under a file lock so racing processes build it once. Keyed
    by the builder's content (`builder_key`) as well as the seed: a changed builder builds a new dir."""
    from diffray.models.tiny import build_pipeline_dir, builder_key

    target = cache_dir() / "models" / f"{preset}-seed{seed}-{builder_key(preset)}"
    if (target / "model_index.json").is_file():  # written last (dir appears atomically): complete
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if not (target / "model_index.json").is_file():
            build_pipeline_dir(target, preset=preset, seed=seed)
    return target


def resolve_model_path(path: str) -> str:
    """Turn a model reference into something `from_pretrained` can read.

    Args:
        path: `builtin:<preset>[?seed=N]` (built into `cache_dir()/models/<preset>-seed<N>-<builder key>`
            on first use), a local diffusers dir, or a hub id.
    Returns:
        An absolute dir for builtins and local dirs; a hub id unchanged.
    Raises:
        ModelError: unknown builtin preset, or a local dir that is missing or not a diffusers layout.
    """
    path = str(path)
    if is_builtin(path):
        return str(_build_cached(*parse_builtin(path)))
    p = Path(path).expanduser()
    if not p.exists():
        if not looks_like_hub_id(path):
            raise ModelError(f"{p}: model dir does not exist")
        return path  # a hub id: from_pretrained resolves it where the cluster has network access
    if not ((p / "model_index.json").is_file() or (p / "unet" / "config.json").is_file()):
        raise ModelError(f"{p}: not a diffusers model dir (no model_index.json and no unet/config.json)")
    return str(p.resolve())


def _load(cls: Any, path: str, subfolder: str, **kwargs: Any) -> Any:
    try:
        return cls.from_pretrained(path, subfolder=subfolder, **kwargs)
    except LOAD_ERRORS as exc:
        raise ModelError(f"{path}: cannot load {subfolder}: {str(exc).strip().splitlines()[0]}") from None


def _checked_tokenizer(tokenizer: Any, path: str) -> Any:
    # transformers 5 returns a specials-only tokenizer instead of failing when its files are missing.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise ModelError(f"{path}: cannot load tokenizer: no vocabulary found (tokenizer/ missing, empty "
                         "or not reachable)")
    return tokenizer


def load_components(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    second_encoder: bool = False, denoiser: bool = True) -> SDComponents:
    """Tokenizer, text encoder, VAE, UNet and the training noise scheduler (DDPM, from whatever scheduler
    config the dir ships) from a diffusers dir (or hub id); the models are loaded in `dtype` and moved to
    `device`. `second_encoder`: also SDXL's `tokenizer_2` and `text_encoder_2` (with projection);
    `denoiser=False` leaves the UNet out (None). Raises `ModelError` naming the path."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_hf()
    models = dict(dtype=dtype, use_safetensors=True)  # dtype at load keeps diffusers' fp32-only modules
    second = {}
    if second_encoder:
        second = dict(tokenizer_2=_checked_tokenizer(_load(CLIPTokenizer, path, "tokenizer_2"), path),
                      text_encoder_2=_load(CLIPTextModelWithProjection, path, "text_encoder_2", **models).to(device))
    return SDComponents(
        tokenizer=_checked_tokenizer(_load(CLIPTokenizer, path, "tokenizer"), path),
        text_encoder=_load(CLIPTextModel, path, "text_encoder", **models).to(device),
        vae=_load(AutoencoderKL, path, "vae", **models).to(device),
        unet=_load(UNet2DConditionModel, path, "unet", **models).to(device) if denoiser else None,
        noise_scheduler=_load(DDPMScheduler, path, "scheduler"),
        **second,
    )


def load_pipeline(path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The stock pipeline of a diffusers dir or hub id, by its family: `StableDiffusionPipeline` (no safety
    checker), `StableDiffusionXLPipeline` or `FluxPipeline`. Raises `ModelError` naming the path."""
    import diffusers

    quiet_hf()
    name = pipeline_class_of(path)
    if name not in ("StableDiffusionXLPipeline", "FluxPipeline"):
        name = "StableDiffusionPipeline"
    extra = {"safety_checker": None} if name == "StableDiffusionPipeline" else {}
    try:
        pipe = getattr(diffusers, name).from_pretrained(path, dtype=dtype, use_safetensors=True, **extra)
    except LOAD_ERRORS as exc:
        raise ModelError(f"{path}: cannot load pipeline: {str(exc).strip().splitlines()[0]}") from None
    _checked_tokenizer(pipe.tokenizer, path)
    return pipe.to(device)


def load_controlnet(path: str):
    """A ControlNet from a diffusers dir (safetensors only). Raises ModelError naming the path."""
    from diffusers import ControlNetModel

    quiet_hf()
    try:
        return ControlNetModel.from_pretrained(path, use_safetensors=True)
    except LOAD_ERRORS as exc:
        raise ModelError(f"{path}: not a ControlNet dir ({str(exc).strip().splitlines()[0]})") from None


def native_size(path: str) -> int:
    """Pixels of the model's native square size, from its config files alone (no weights): those of a local
    dir (`resolve_model_path`'s), or of a hub id through huggingface_hub (fetched once, then read from its
    cache; `HF_HUB_OFFLINE` reads the cache only). `FALLBACK_SIZE`, with a warning, when they cannot be read.
    """

    def config(name: str) -> dict:
        if Path(path).is_dir():
            return json.loads((Path(path) / name).read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(path, name)).read_text())

    try:
        vae = config("vae/config.json")
        local = Path(path).is_dir()
        if (Path(path) / "transformer").is_dir() if local else "transformer" in config("model_index.json"):
            return int(vae["sample_size"])  # Flux: the VAE's size (FluxPipeline says 1024 for any)
        return int(config("unet/config.json")["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except Exception as exc:  # noqa: BLE001 - unreadable, missing or offline: the fallback below says so
        first_line = (str(exc).splitlines() or [""])[0]
        log.warning("the native size of model %s is unknown (%s: %s): requests that give no size are drawn at "
                    "%d px; set default_size to choose", path, type(exc).__name__, first_line, FALLBACK_SIZE)
        return FALLBACK_SIZE
