"""Image generation with a stock diffusers pipeline plus optional adapters: LoRA or Textual Inversion, and
one or more ControlNets with their control images (no Ray)."""

from __future__ import annotations

import math
import os
import uuid
import warnings
from pathlib import Path

import torch

from diffray.errors import AdapterError, ConfigError
from diffray.images import make_grid
from diffray.models.flux import call_args
from diffray.models.adapters import LORA_WEIGHTS, PEFT_WEIGHTS, load_peft_adapter
from diffray.models.textual_inversion import TI_WEIGHTS, load_textual_inversion

MAX_PROMPT_CHARS = 1000  # the server's default `limits.max_prompt_chars`: CLIP reads 77 tokens, the rest is lost
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's largest seed (and the server's)


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
            raise AdapterError(f"{d}: cannot load the PEFT adapter into this base model: {first_problem(exc)}") \
                from None
        return pipe
    if not (d / LORA_WEIGHTS).is_file():
        raise AdapterError(f"{d}: no {LORA_WEIGHTS} or {PEFT_WEIGHTS} (is this a LoRA adapter dir?)")
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # it logs the failure we raise, line by line
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(d), weight_name=LORA_WEIGHTS, adapter_name=adapter_name, use_safetensors=True)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise AdapterError(f"{d}: cannot load LoRA into this base model: {first_problem(exc)}") from None
    finally:
        diffusers_logging.set_verbosity(level)
    for w in caught:  # a load that worked keeps PEFT's warnings (layers of the file the model lacks)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return pipe


def first_problem(exc: Exception) -> str:
    """One line of a loader's error: torch's state-dict report lists every size mismatch on its own line."""
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()] or [type(exc).__name__]
    mismatches = [x for x in lines if x.startswith("size mismatch")]
    if not mismatches:
        return lines[0]
    more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
    return f"{mismatches[0].rstrip('.')}{more}: a LoRA of a model of another shape"


def check_adapter_dir(path: str, field: str, weights: tuple[str, ...] = (LORA_WEIGHTS, PEFT_WEIGHTS, TI_WEIGHTS)
                      ) -> dict:
    """The card of an adapter (or ControlNet) folder, after checking, before any model loads, that it is a
    folder holding one of `weights`, its card is a JSON object and its safetensors files are whole and finite.

    Raises:
        ConfigError: naming `field` and the folder.
    """
    from diffray.serve.artifacts import ArtifactProblem, check_safetensors, read_card

    d = Path(path)
    if not d.is_dir():
        raise ConfigError(f"{d}: {'not a folder' if d.exists() else 'no such folder'}", field=field)
    try:
        card = read_card(d)
    except (ArtifactProblem, OSError) as exc:
        raise ConfigError(f"{d}: {exc}", field=field) from None
    present = [d / w for w in weights if (d / w).is_file()]
    if not present:
        what = " (it holds a ControlNet: give it with --controlnet)" if (
            (d / "config.json").is_file() and field.endswith("adapter")) else ""
        raise ConfigError(f"{d}: holds none of {', '.join(weights)}{what}", field=field)
    for f in present:
        try:
            problem = check_safetensors(f).problem
        except OSError as exc:
            problem = f"{f.name}: cannot be read ({exc.strerror})"
        if problem:
            raise ConfigError(f"{d}: {problem}", field=field)
    return card


def check_family(card: dict, path: str, base_path: str, field: str) -> None:
    """ConfigError when the card says the folder was trained for another model family than the base's, or
    for another Stable Diffusion version (`artifacts.base_mismatch` of its `base_model_config`; reads the base's
    config files, no weights). A card without it is accepted: loading names a LoRA of another shape."""
    from diffray.models.family import base_version, family_of
    from diffray.serve.artifacts import base_mismatch

    trained, base = card.get("family"), family_of(base_path).name
    if isinstance(trained, str) and trained and trained != base:
        raise ConfigError(f"{path}: trained for a {trained} model, but the base model is a {base} model; give "
                          "--model the adapter's base (its card's base_model)", field=field)
    mismatch = base_mismatch(card, (), base_version(base, base_path))
    if mismatch:
        raise ConfigError(f"{path}: trained on {mismatch[0]}, but the base model is {mismatch[1]}; give --model "
                          "the adapter's base (its card's base_model)", field=field)


def check_render_options(prompts: list[str], seed: int, num_images: int, steps: int, guidance: float | None,
                         lora_scale: float, control_scales: list[float]) -> None:
    """ConfigError naming the option and its limit for a value the pipeline would take and draw wrong with."""
    for i, p in enumerate(prompts):
        if not p.strip():
            raise ConfigError(f"prompt {i + 1} is empty", field="--prompt")
        if len(p) > MAX_PROMPT_CHARS:
            raise ConfigError(f"prompt {i + 1} has {len(p)} characters; at most {MAX_PROMPT_CHARS}", field="--prompt")
    if num_images < 1 or steps < 1:
        raise ConfigError(f"must be >= 1, got {min(num_images, steps)}",
                          field="--num-images" if num_images < 1 else "--steps")
    if not 0 <= seed <= MAX_SEED - (num_images - 1):
        raise ConfigError(f"{seed} must be in [0, 2^63 - {num_images}] (image j uses seed + j)", field="--seed")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise ConfigError(f"{guidance} must be a finite number >= 0", field="--guidance")
    for name, values in (("--lora-scale", [lora_scale]), ("--control-scale", control_scales)):
        if any(not math.isfinite(v) for v in values):
            raise ConfigError(f"must be a finite number, got {[v for v in values if not math.isfinite(v)][0]}",
                              field=name)


def check_out_file(out: Path) -> None:
    """ConfigError (naming --out) when the grid cannot be written there: a folder, an extension PIL cannot
    write, a parent that is a file or a folder that cannot be written. Checked before any model loads."""
    from PIL import Image

    if out.is_dir():
        raise ConfigError(f"{out} is a folder; give a file name, e.g. {out / 'grid.png'}", field="--out")
    fmt = Image.registered_extensions().get(out.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ConfigError(f"{out}: {out.suffix or 'no extension'} is not an image format; use .png, .jpg or "
                          ".webp", field="--out")
    parent = check_parent(out, "--out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{out}: cannot write in {parent} (permission denied)", field="--out")


def check_parent(out: Path, field: str) -> Path:
    """The nearest existing folder above `out` (where writing will create the rest); ConfigError naming
    `field` when that is a file."""
    from diffray.storage import nearest_existing_above

    parent = nearest_existing_above(out)
    if not parent.is_dir():
        raise ConfigError(f"{out}: {parent} is a file, not a folder", field=field)
    return parent


def save_atomically(image, out: Path) -> None:
    """Save through a temporary sibling renamed into place: an existing file is replaced whole, never left
    half-written; ConfigError (naming --out) when the disk refuses."""
    tmp = out.with_name(f".{out.stem}.tmp-{uuid.uuid4().hex[:8]}{out.suffix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{out}: cannot write ({exc.strerror or exc})", field="--out") from None


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

    controlnets, out = list(controlnets or []), Path(out)
    scales = check_controls(controlnets, list(control_images or []), list(control_scales or []))
    check_render_options(prompts, seed, num_images, steps, guidance, lora_scale, scales)
    check_out_file(out)
    dirs = [("--adapter", adapter)] * bool(adapter) + [("--controlnet", c) for c in controlnets]
    cards = [check_adapter_dir(d, f, ("diffusion_pytorch_model.safetensors",) if f == "--controlnet" else
                               (LORA_WEIGHTS, PEFT_WEIGHTS, TI_WEIGHTS)) for f, d in dirs]
    base = model or next((c["base_model"] for c in cards if isinstance(c.get("base_model"), str)), None) \
        or "builtin:tiny"
    base_path = resolve_model_path(base)
    for (field, d), card in zip(dirs, cards):
        check_family(card, d, base_path, field)
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
        try:
            load_adapter(pipe, adapter)
        except AdapterError as exc:
            raise ConfigError(str(exc), field="--adapter") from None
    if adapter is not None or controlnets:
        rows += render(pipe, prompts, seed, num_images, steps, guidance, lora_scale if adapter else None, extra)
        method = cards[0].get("method") if adapter else None
        names = [method if isinstance(method, str) else "adapter"] * bool(adapter) + ["controlnet"] * bool(controlnets)
        labels += ["+".join(names)] * len(prompts)
    save_atomically(make_grid(rows, labels), out)
    return out
