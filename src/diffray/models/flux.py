"""Flux (FLUX.1-dev/schnell layout): a rectified-flow transformer (`FluxTransformer2DModel`) over packed 2x2
latent patches, conditioned on T5 token states, CLIP's pooled output and (dev) a guidance value; trained
with the flow-matching objective. The family class here plugs into `diffray.models.family`; the presets'
parts built by our code (the T5 tokenizer) are in `diffray.models.flux_build`.

Training follows diffusers' Flux LoRA recipe: each row's sigma drawn (keyed by (seed, step, sample_id)
like every draw) as the `flow:` section says (uniform over the scheduler's sigmas by default, logit-normal
or mode density, optional shift), noisy = (1 - sigma) * latents + sigma * noise, target = noise - latents,
the transformer fed sigma (`timestep / 1000`, as `FluxPipeline` passes it) and, when guidance-distilled,
`flow.guidance`. Latents are the VAE's, shifted and scaled by its `shift_factor`/`scaling_factor`. Never
imports Ray.
"""

from __future__ import annotations

import torch

from diffray.errors import ConfigError
from diffray.models.loading import SDComponents, _checked_tokenizer, _load
from diffray.trainers.components.diffusion import NoisedLatents, batch_latents, sample_noise_and_timesteps

FLUX_GUIDANCE = 3.5  # the default guidance value a guidance-distilled (dev) transformer trains at (flow.guidance)
def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H/2 * W/2, 4C]: `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack` for latents of (h, w)."""
    b, _, c4 = packed.shape
    x = packed.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """The packed latents' positions [h/2 * w/2, 3] (0, row, column): `FluxPipeline`'s image ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def flux_forward(transformer, latents: torch.Tensor, timesteps: torch.Tensor, states: torch.Tensor,
                 pooled: torch.Tensor, guidance: float = FLUX_GUIDANCE) -> torch.Tensor:
    """The transformer's flow prediction [B, C, H, W] for latents [B, C, H, W] at `timesteps` [B] (sigma *
    1000), as `FluxPipeline` calls it (packed patches, timestep / 1000, text ids at 0, guidance when the
    transformer embeds it)."""
    b, _, h, w = latents.shape
    embed = None
    if transformer.config.guidance_embeds:
        embed = torch.full((b,), float(guidance), device=latents.device, dtype=latents.dtype)
    out = transformer(hidden_states=pack(latents), timestep=(timesteps / 1000).to(latents.dtype), guidance=embed,
                      pooled_projections=pooled, encoder_hidden_states=states,
                      txt_ids=torch.zeros(states.shape[1], 3, device=latents.device, dtype=latents.dtype),
                      img_ids=image_ids(h, w, latents.device, latents.dtype)).sample
    return unpack(out, h, w)


class Flux:
    """FLUX.1: CLIP (pooled) + T5 (token states), `FluxTransformer2DModel` in `SDComponents.unet`,
    flow-matching training. Token ids are [B, 77 + L]: CLIP's then T5's, concatenated. LoRA and
    DreamBooth-LoRA (with prior preservation) so far."""

    name = "flux"
    default_guidance = FLUX_GUIDANCE  # the distilled guidance value FLUX.1-dev draws at (FluxPipeline's default)
    pipeline_classes = ("FluxPipeline",)
    methods = ("lora", "dreambooth")

    def check(self, method: str, cfg) -> None:
        if method not in self.methods:
            raise ConfigError(f"method {method!r} does not train Flux models yet (Flux: {', '.join(self.methods)})",
                              field="method")
        refused = {"lora.train_text_encoder": "a text-encoder LoRA on Flux is not supported yet",
                   "lora.init_from": "starting a Flux LoRA from another adapter is not supported yet",
                   "export.formats": "the kohya/peft/diffusers copies are written for SD LoRAs only",
                   "data.shuffle_tags": "tag shuffling works on one tokenizer's ids; not with Flux yet",
                   "train.snr_gamma": "Min-SNR weighting is for DDPM training; Flux trains by flow matching",
                   "model.prediction_type": "Flux predicts the flow (noise - latents); it has no other target",
                   "data.aspect_buckets": "aspect buckets are not packed into Flux's 2x2 patches yet"}
        for field, why in refused.items():
            section, _, key = field.partition(".")
            value = getattr(getattr(cfg, section, None), key, None)
            if value not in (None, False, (), [], "", "off"):
                raise ConfigError(why, field=field)
        if method == "dreambooth" and cfg.dreambooth.mode != "lora":
            raise ConfigError("DreamBooth on Flux trains a LoRA (mode: lora); full fine-tuning of the 12B "
                              "transformer is not supported yet", field="dreambooth.mode")
        if cfg.train.timestep_range and cfg.flow.timestep_sampling != "uniform":
            raise ConfigError("a timestep range draws uniformly; not with flow.timestep_sampling "
                              f"{cfg.flow.timestep_sampling}", field="train.timestep_range")
        if cfg.train.attention != "sdpa":
            raise ConfigError("a Flux transformer has the sdpa kernel only", field="train.attention")
        if getattr(cfg.lora, "variant", "lora") != "lora":
            raise ConfigError("Flux LoRAs are plain LoRA (diffusers' Flux layout)", field="lora.variant")

    def load(self, model_path: str, dtype: torch.dtype = torch.float32, device="cpu",
             denoiser: bool = True) -> SDComponents:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        models = dict(dtype=dtype, use_safetensors=True)
        return SDComponents(
            tokenizer=_checked_tokenizer(_load(CLIPTokenizer, model_path, "tokenizer"), model_path),
            text_encoder=_load(CLIPTextModel, model_path, "text_encoder", **models).to(device),
            tokenizer_2=_checked_tokenizer(_load(T5TokenizerFast, model_path, "tokenizer_2"), model_path),
            text_encoder_2=_load(T5EncoderModel, model_path, "text_encoder_2", **models).to(device),
            vae=_load(AutoencoderKL, model_path, "vae", **models).to(device),
            unet=_load(FluxTransformer2DModel, model_path, "transformer", **models).to(device) if denoiser else None,
            noise_scheduler=_load(FlowMatchEulerDiscreteScheduler, model_path, "scheduler"))

    @staticmethod
    def t5_length(comps) -> int:
        """The T5 sequence length trained and rendered at: the tokenizer's `model_max_length`, at most 512
        (`comps`: model parts or a pipeline, anything with `tokenizer_2`)."""
        return min(int(comps.tokenizer_2.model_max_length), 512)

    def tokenize(self, comps, prompts: list[str]) -> torch.Tensor:
        clip = comps.tokenizer(prompts, padding="max_length", truncation=True,
                               max_length=comps.tokenizer.model_max_length, return_tensors="pt").input_ids
        t5 = comps.tokenizer_2(prompts, padding="max_length", truncation=True, max_length=self.t5_length(comps),
                               return_tensors="pt").input_ids
        return torch.cat([clip, t5], dim=1)

    def conditioning(self, comps, input_ids: torch.Tensor, batch: dict, size: tuple[int, int]) -> dict:
        return self.states_conditioning(comps, *self.text_states(comps, input_ids), batch, size)

    def text_states(self, comps, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 states [B, L, D] and CLIP's pooled output [B, P], as `FluxPipeline.encode_prompt` computes them."""
        n = comps.tokenizer.model_max_length
        pooled = comps.text_encoder(input_ids[:, :n], output_hidden_states=False).pooler_output
        states = comps.text_encoder_2(input_ids[:, n:], output_hidden_states=False)[0]
        return states, pooled

    def states_conditioning(self, comps, hidden: torch.Tensor, pooled: torch.Tensor, batch: dict,
                            size: tuple[int, int]) -> dict:
        return {"encoder_hidden_states": hidden, "added_cond_kwargs": {"pooled_projections": pooled}}

    def prediction_type(self, comps, configured: str | None) -> str:
        return "flow_match"

    def noised(self, comps, batch: dict, device, dtype, step: int, seed: int, noise_offset: float,
               timestep_range: tuple[int, int] | None = None, flow=None) -> NoisedLatents:
        """Latents ((sample - shift) * scale; from the latent cache's rows or the VAE), noise and sigma of
        each row keyed by (seed, step, sample_id), the noisy latents on the straight path between them.
        `timesteps` holds sigma * 1000; sigma follows the `flow` section (`sigmas`)."""
        vae, scheduler = comps.vae, comps.noise_scheduler
        ids = [int(i) for i in batch["sample_id"]]
        shift = vae.config.scaling_factor * (vae.config.shift_factor or 0.0)
        latents = batch_latents(vae, batch, device, dtype, step, seed) - shift
        noise, index = sample_noise_and_timesteps(tuple(latents.shape[1:]), ids, step, seed,
                                                  scheduler.config.num_train_timesteps, noise_offset, timestep_range)
        sigmas = self.sigmas(scheduler, index, ids, step, seed, flow).to(latents.device)
        noise = noise.to(latents.device)
        s = sigmas.view(-1, 1, 1, 1)
        return NoisedLatents(latents, noise, sigmas * 1000, (1 - s) * latents + s * noise)

    @staticmethod
    def sigmas(scheduler, index: torch.Tensor, ids: list[int], step: int, seed: int, flow=None) -> torch.Tensor:
        """Each row's sigma [B] (fp32), as diffusers' Flux/SD3 recipe draws it: an index into the scheduler's
        sigmas, uniform (`index`: the keyed draw, within `train.timestep_range`), or from u ~ logit-normal /
        mode density (keyed by (seed, step, sample_id) too) as int(u * N). With `flow.shift` the sigma is the
        unshifted (N - index) / N shifted: shift * s / (1 + (shift - 1) * s)."""
        import math

        from diffray.trainers.components.diffusion import sample_generator

        n = scheduler.config.num_train_timesteps
        kind = getattr(flow, "timestep_sampling", "uniform")
        if kind != "uniform":
            z = torch.stack([torch.randn((), generator=sample_generator(seed + 104729, step, i)) for i in ids])
            if kind == "logit_normal":
                u = torch.sigmoid(flow.logit_mean + flow.logit_std * z)
            else:  # "mode": u uniform, then 1 - u - scale * (cos(pi u / 2)^2 - 1 + u)
                u = torch.special.ndtr(z)
                u = 1 - u - flow.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
            index = (u * n).long().clamp(0, n - 1)
        index = index.long()
        if flow is None or flow.shift is None:
            return scheduler.sigmas[index].float()
        s = (n - index).float() / n
        return flow.shift * s / (1 + (flow.shift - 1) * s)

    def forward_kwargs(self, cfg) -> dict:
        """Extra inputs of the denoiser's forward: the guidance value a guidance-distilled transformer trains at."""
        return {"guidance": cfg.flow.guidance}

    def target(self, comps, n: NoisedLatents, prediction_type: str) -> torch.Tensor:
        return n.noise - n.latents

    def sampler(self, comps):
        """Validation samples with the shipped flow-matching Euler scheduler (a fresh copy)."""
        return type(comps.noise_scheduler).from_config(comps.noise_scheduler.config)

    def render_args(self, comps, resolution: int) -> dict:
        """Render at the trained size and T5 length (`FluxPipeline` defaults to 1024 px and 512 tokens)."""
        return {"height": resolution, "width": resolution, "max_sequence_length": self.t5_length(comps)}

    def pipeline(self, comps, unet=None, text_encoder=None, scheduler=None):
        """A `FluxPipeline` over the given (live) parts; render with `max_sequence_length=t5_length(comps)`
        to match training (`generate` and validation do)."""
        from diffusers import FluxPipeline

        pipe = FluxPipeline(scheduler=scheduler or comps.noise_scheduler, vae=comps.vae,
                            text_encoder=text_encoder or comps.text_encoder, tokenizer=comps.tokenizer,
                            text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2,
                            transformer=unet or comps.unet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def controlnet_pipeline(self, comps, controlnet, unet=None, scheduler=None):
        raise ConfigError("ControlNet on Flux is not supported yet", field="controlnet")


def call_args(pipe) -> dict:
    """A `FluxPipeline`'s call arguments for the size its VAE was made for and the T5 length its tokenizer
    names (the pipeline's defaults are 1024 px and 512 tokens whatever the model); {} for other pipelines."""
    if type(pipe).__name__ != "FluxPipeline":
        return {}
    size = int(pipe.vae.config.sample_size)
    return {"height": size, "width": size, "max_sequence_length": Flux.t5_length(pipe)}

