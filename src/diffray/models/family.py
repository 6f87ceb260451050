"""The model-family seam: what differs between Stable Diffusion 1.x/2.x, SDXL, Flux, ... when training a
denoiser. A family knows how to load its parts, tokenize and encode prompts, noise latents and compute
the training target, and how to assemble an inference pipeline from (possibly trained) parts.

`StableDiffusion` (SD 1.x/2.x: CLIP text encoder, UNet2DConditionModel, AutoencoderKL, DDPM training
schedule), `StableDiffusionXL` (two CLIP encoders, pooled embedding and size/crop ids as added
conditioning, same epsilon/v-prediction training) and `Flux` (`diffray.models.flux`: CLIP + T5, a
flow-matching transformer); `family_of(model_path)` picks one by the dir's `model_index.json`. A new
family is a class with the same methods, added to `FAMILIES`; `check` refuses a method or option it does
not support, before Ray starts. Never imports Ray.
"""

from __future__ import annotations

import logging

import torch

from diffray.errors import ConfigError, ModelError
from diffray.models.flux import Flux
from diffray.models.loading import LOAD_ERRORS, SDComponents, load_components, pipeline_class_of
from diffray.trainers.components.diffusion import NoisedLatents, diffusion_target, noise_latents


def refuse_flow(cfg) -> None:
    """A DDPM-trained family: any `flow:` setting is a ConfigError naming it."""
    flow = getattr(cfg, "flow", None)
    if flow is not None and not flow.is_default():
        defaults = type(flow)()
        changed = next(k for k, v in flow if v != getattr(defaults, k))
        raise ConfigError("flow-matching settings apply to Flux models only; this model trains by DDPM",
                          field=f"flow.{changed}")


class StableDiffusion:
    """SD 1.x / 2.x (epsilon or v-prediction)."""

    name = "stable-diffusion"
    default_guidance = 7.5  # classifier-free guidance scale when a render names none
    pipeline_classes = ("StableDiffusionPipeline",)

    def check(self, method: str, cfg) -> None:
        """Refuse (ConfigError naming the field) a method or option this family does not train: every one
        is supported here but the flow-matching section."""
        refuse_flow(cfg)

    def load(self, model_path: str, dtype: torch.dtype = torch.float32, device="cpu",
             denoiser: bool = True) -> SDComponents:
        """The model's parts; `denoiser=False` leaves the UNet (transformer) out, as the latent cache needs."""
        return load_components(model_path, dtype=dtype, device=device, denoiser=denoiser)

    def tokenize(self, comps, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, 77] (padded to the tokenizer's length, truncated)."""
        return comps.tokenizer(prompts, padding="max_length", truncation=True,
                               max_length=comps.tokenizer.model_max_length, return_tensors="pt").input_ids

    def encode(self, text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
        """Text-encoder states [B, 77, D] that condition the denoiser (with grad when the encoder trains)."""
        return text_encoder(input_ids)[0]

    def conditioning(self, comps, input_ids: torch.Tensor, batch: dict, size: tuple[int, int]) -> dict:
        """The denoiser's text conditioning kwargs of token ids (as `tokenize` makes them) from the frozen
        encoders; `batch` and the pixel `size` (H, W) are for families with size conditioning."""
        return {"encoder_hidden_states": self.encode(comps.text_encoder, input_ids)}

    def text_states(self, comps, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(states [B, T, D], pooled [B, P]) of token ids from the frozen encoders: what the latent cache
        stores per row (`prompt_embeds`, `pooled_prompt_embeds`) and `states_conditioning` reads back."""
        hidden, pooled = comps.text_encoder(input_ids)[:2]
        return hidden, pooled

    def states_conditioning(self, comps, hidden: torch.Tensor, pooled: torch.Tensor, batch: dict,
                            size: tuple[int, int]) -> dict:
        """`conditioning`'s kwargs from `text_states` (cached rows: no encoder call)."""
        return {"encoder_hidden_states": hidden}

    def prediction_type(self, comps, configured: str | None) -> str:
        return configured or comps.noise_scheduler.config.prediction_type

    def forward_kwargs(self, cfg) -> dict:
        """Extra inputs of the denoiser's forward from the config (none here)."""
        return {}

    def noised(self, comps, batch: dict, device, dtype, step: int, seed: int, noise_offset: float,
               timestep_range: tuple[int, int] | None = None, flow=None) -> NoisedLatents:
        """Latents of a batch (pixels through the VAE, or the latent cache) and their noised version, every
        draw keyed by (seed, step, sample_id); timesteps from `timestep_range` ([lo, hi)) when given."""
        return noise_latents(comps.vae, comps.noise_scheduler, batch, device, dtype, step, seed, noise_offset,
                             timestep_range)

    def target(self, comps, n: NoisedLatents, prediction_type: str) -> torch.Tensor:
        return diffusion_target(comps.noise_scheduler, n.latents, n.noise, n.timesteps, prediction_type)

    def sampler(self, comps):
        """The scheduler validation renders with: DDIM over the training schedule."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(comps.noise_scheduler.config)

    def render_args(self, comps, resolution: int) -> dict:
        """Pipeline-call arguments that rendering at `resolution` needs beyond the prompt (none here)."""
        return {}

    def pipeline(self, comps, unet=None, text_encoder=None, scheduler=None):
        """A `StableDiffusionPipeline` over the given (live, possibly trained) parts; the loaded ones
        where None. Nothing is copied, so rendering sees the current weights."""
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=text_encoder or comps.text_encoder,
                                       tokenizer=comps.tokenizer, unet=unet or comps.unet,
                                       scheduler=scheduler or comps.noise_scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def controlnet_pipeline(self, comps, controlnet, unet=None, scheduler=None):
        """A `StableDiffusionControlNetPipeline` over the given (live) parts."""
        from diffusers import StableDiffusionControlNetPipeline

        pipe = StableDiffusionControlNetPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=unet or comps.unet,
            controlnet=controlnet, scheduler=scheduler or comps.noise_scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def base_model_config(model_path: str) -> dict:
    """What tells an SD 1.x base from an SD 2.x one, from the model's own config files (no weights; a hub id's
    through the Hugging Face cache, as loading reads them): the text encoder's activation and width (SD 1.x's
    CLIP ViT-L: quick_gelu, 768; SD 2.x's OpenCLIP ViT-H: gelu, 1024) and the scheduler's prediction type
    (SD 2.x 768-v: v_prediction). A LoRA's card records it (`base_model_config`) so that its kohya export
    names the base it needs (`export_io.sd_base`).

    Raises:
        ModelError: naming the path, when a config cannot be read.
    """
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig

    try:  # the libraries' readers: a field the file leaves out is their default, as the model runs with it
        encoder_config, _ = CLIPTextConfig.get_config_dict(model_path, subfolder="text_encoder")
        scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(model_path, subfolder="scheduler"))
    except LOAD_ERRORS as exc:
        raise ModelError(f"{model_path}: cannot read its configs ({str(exc).strip().splitlines()[0]})") from None
    if not encoder_config:  # transformers reads a missing config.json as an empty one: all defaults, a guess
        raise ModelError(f"{model_path}: cannot read its configs (no text_encoder/config.json)")
    text_encoder = CLIPTextConfig.from_dict(encoder_config)
    return {"text_encoder": {"hidden_act": text_encoder.hidden_act, "hidden_size": text_encoder.hidden_size},
            "prediction_type": scheduler.config.prediction_type}


def version_fields(family_name: str, model_path: str) -> dict:
    """A card's `base_model_config` (`base_model_config`) for a Stable Diffusion base, so that a kohya export names
    the SD version it needs; {} for other families, or when the configs cannot be read (logged: the export then
    says SD 1.x, and the trained weights are worth more than the label)."""
    if family_name != StableDiffusion.name:
        return {}
    try:
        return {"base_model_config": base_model_config(model_path)}
    except ModelError as exc:
        logging.getLogger(__name__).warning("the card does not say which SD version the adapter is for (%s); a "
                                            "kohya export says SD 1.x", exc)
        return {}


def base_version(family_name: str, model_path: str) -> dict | None:
    """A Stable Diffusion base's `base_model_config`, what an adapter's card is matched against so that an SD 2.x
    adapter is refused on an SD 1.x base and the reverse (`artifacts.base_mismatch`); None for other families,
    or when the configs cannot be read (logged: adapters are then matched by family only)."""
    if family_name != StableDiffusion.name:
        return None
    try:
        return base_model_config(model_path)
    except ModelError as exc:
        logging.getLogger(__name__).warning("adapters are matched to the base by family only, not SD version (%s)",
                                            exc)
        return None


def sdxl_text_states(text_encoder, text_encoder_2, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt states of token ids [B, 2, 77]: both encoders' penultimate hidden states concatenated
    [B, 77, D1 + D2], and the second encoder's pooled projection [B, P], as `StableDiffusionXLPipeline`
    computes them (with grad when an encoder trains)."""
    states = []
    for i, encoder in enumerate((text_encoder, text_encoder_2)):
        out = encoder(input_ids[:, i], output_hidden_states=True)
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), out.text_embeds


class StableDiffusionXL(StableDiffusion):
    """SDXL: the UNet attends to both CLIP encoders' penultimate states, concatenated, and adds an embedding
    of the second encoder's pooled (projected) output and six size ids: the image's original (H, W), the
    crop's top-left (y, x) and the target (H, W), as SDXL was trained (`micro_cond` rows of the data
    pipeline give the first four; without them the image is taken as uncropped at its size). Token ids are
    [B, 2, 77]: one row per tokenizer."""

    name = "stable-diffusion-xl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    methods = ("lora", "dreambooth", "full", "controlnet", "textual_inversion", "ddpo")

    def check(self, method: str, cfg) -> None:
        refuse_flow(cfg)
        if method not in self.methods:
            raise ConfigError(f"method {method!r} does not train SDXL models yet (SDXL: {', '.join(self.methods)})",
                              field="method")
        field = {"full": "full.train_text_encoder"}.get(method)
        if method == "dreambooth" and cfg.dreambooth.mode == "full":
            field = "dreambooth.train_text_encoder"
        if field and getattr(getattr(cfg, field.split(".")[0]), field.split(".")[1]):
            raise ConfigError("SDXL fine-tunes the UNet only; a text-encoder LoRA (lora.train_text_encoder) trains "
                              "both encoders", field=field)
        lora = getattr(cfg, "lora", None)
        if lora is not None and method in ("lora", "dreambooth", "ddpo") and lora.init_from:
            raise ConfigError("starting an SDXL LoRA from another adapter is not supported yet", field="lora.init_from")
        export = getattr(cfg, "export", None)
        if export is not None and export.formats:
            raise ConfigError("the kohya/peft/diffusers copies are written for SD LoRAs only; the SDXL artifact "
                              "is diffusers' layout already", field="export.formats")
        if cfg.data is not None and cfg.data.shuffle_tags:
            raise ConfigError("tag shuffling works on one tokenizer's ids; not with SDXL yet",
                              field="data.shuffle_tags")

    def load(self, model_path: str, dtype: torch.dtype = torch.float32, device="cpu",
             denoiser: bool = True) -> SDComponents:
        return load_components(model_path, dtype=dtype, device=device, second_encoder=True, denoiser=denoiser)

    def tokenize(self, comps, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, 2, 77]: each tokenizer's (they pad differently)."""
        return torch.stack([tok(prompts, padding="max_length", truncation=True, max_length=tok.model_max_length,
                                return_tensors="pt").input_ids for tok in (comps.tokenizer, comps.tokenizer_2)], 1)

    def encode(self, text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("SDXL prompts need both encoders: use conditioning()")

    def conditioning(self, comps, input_ids: torch.Tensor, batch: dict, size: tuple[int, int]) -> dict:
        return self.states_conditioning(comps, *self.text_states(comps, input_ids), batch, size)

    def text_states(self, comps, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sdxl_text_states(comps.text_encoder, comps.text_encoder_2, input_ids)

    def states_conditioning(self, comps, hidden: torch.Tensor, pooled: torch.Tensor, batch: dict,
                            size: tuple[int, int]) -> dict:
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self.time_ids(batch, size, pooled)}}

    @staticmethod
    def time_ids(batch: dict, size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """[B, 6]: original (H, W), crop top-left (y, x), target (H, W) of each row."""
        b = like.shape[0]
        if "micro_cond" in batch:
            first = torch.as_tensor(batch["micro_cond"]).reshape(b, 4)
        else:
            first = torch.tensor([size[0], size[1], 0, 0]).expand(b, 4)
        target = torch.tensor(size).expand(b, 2)
        return torch.cat([first, target], dim=1).to(like.device, like.dtype)

    def pipeline(self, comps, unet=None, text_encoder=None, scheduler=None):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=comps.vae, text_encoder=text_encoder or comps.text_encoder,
                                         text_encoder_2=comps.text_encoder_2, tokenizer=comps.tokenizer,
                                         tokenizer_2=comps.tokenizer_2, unet=unet or comps.unet,
                                         scheduler=scheduler or comps.noise_scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def controlnet_pipeline(self, comps, controlnet, unet=None, scheduler=None):
        from diffusers import StableDiffusionXLControlNetPipeline

        pipe = StableDiffusionXLControlNetPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=unet or comps.unet, controlnet=controlnet,
            scheduler=scheduler or comps.noise_scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe


FAMILIES = (StableDiffusion(), StableDiffusionXL(), Flux())


def family_of(model_path: str):
    """The family of a diffusers model dir or hub id (by `model_index.json`'s pipeline class; a hub id's
    index comes through the Hugging Face cache); a dir without the index is taken as Stable Diffusion.

    Raises:
        ModelError: the model is a pipeline of a family diffray does not train, or a hub id whose index
            cannot be read.
    """
    pipeline_class = pipeline_class_of(model_path)
    if not pipeline_class:
        return FAMILIES[0]
    for family in FAMILIES:
        if pipeline_class in family.pipeline_classes:
            return family
    known = ", ".join(c for f in FAMILIES for c in f.pipeline_classes)
    raise ModelError(f"{model_path}: a {pipeline_class} model; diffray trains {known}")
