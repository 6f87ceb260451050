"""The shared base of the methods that train a denoiser on (image, caption) rows: LoRA, DreamBooth,
Textual Inversion, ControlNet (and full fine-tuning).

A method subclasses `DenoisingTask` and declares what trains (`build_module`) and what it exports
(`export`). It may also add inputs to the denoiser's forward (`forward_inputs`: ControlNet's control
images), replace the caption tokens (`prompt_ids`: Textual Inversion's templates) or combine datasets
(`datasets` + `loss`: DreamBooth's prior preservation). Everything else is here, once: loading, freezing
and placing the parts, the keyed denoising loss with caption dropout, the micro-batch loop with its
NaN stop, held-out losses and validation renders. What depends on the model family (loading, prompt
encoding, noise and target, the inference pipeline) goes through `diffray.models.family`.

Worker side: built inside the Ray Train loop (`diffray.trainers.loop`), never on the driver.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from diffray.config import LoraSection
from diffray.models.adapters import add_lora
from diffray.models import speed
from diffray.models.family import family_of, sdxl_text_states
from diffray.models.flux import FLUX_GUIDANCE, flux_forward
from diffray.trainers import session
from diffray.trainers.components.diffusion import batch_mean, caption_dropout_mask, per_sample_loss
from diffray.trainers.steps import StepTask


@contextlib.contextmanager
def adapters_off(module: torch.nn.Module):
    """Every PEFT adapter layer of `module` passes its base layer's output through (the reference model);
    switched back on, trainable as before, on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class Denoiser(torch.nn.Module):
    """The module the engine wraps: the UNet, plus the text encoder(s) when they train (the module then
    encodes token ids itself, so the engine's gradients and sharding reach the encoders). With SDXL's
    second encoder, ids are [B, 2, 77] and `time_ids` are the rows' size ids."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
                 text_encoder_2: torch.nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def forward(self, noisy_latents, timesteps, input_ids=None, encoder_hidden_states=None, added_cond_kwargs=None,
                time_ids=None, guidance=None):
        if added_cond_kwargs and "pooled_projections" in added_cond_kwargs:  # Flux: packed patches, flow
            return flux_forward(self.unet, noisy_latents, timesteps, encoder_hidden_states,
                                added_cond_kwargs["pooled_projections"],
                                FLUX_GUIDANCE if guidance is None else guidance)
        if self.text_encoder_2 is not None:
            encoder_hidden_states, pooled = sdxl_text_states(self.text_encoder, self.text_encoder_2, input_ids)
            added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}
        elif self.text_encoder is not None:
            encoder_hidden_states = self.text_encoder(input_ids)[0]
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added_cond_kwargs).sample


def lora_denoiser(comps, lora: LoraSection, seed: int, gradient_checkpointing: bool = False) -> Denoiser:
    """Frozen base + LoRA on `lora.target_modules` (and on the text encoder, SDXL's two, with
    `lora.train_text_encoder`), initialised from `seed`, so identical on every rank."""
    add_lora(comps.unet, lora.rank, lora.scale_alpha, lora.dropout, lora.target_modules, seed, lora.variant)
    encoders = [e for e in (comps.text_encoder, comps.text_encoder_2) if e is not None]
    for i, encoder in enumerate(encoders):
        encoder.requires_grad_(False)
        if lora.train_text_encoder:
            add_lora(encoder, lora.rank, lora.scale_alpha, lora.dropout, lora.text_encoder_target_modules,
                     seed + 1 + i, lora.variant)
    if lora.init_from:
        from diffray.models.lora_formats import init_lora_from

        init_lora_from(lora.init_from, comps.unet, comps.text_encoder, lora.train_text_encoder, lora.rank,
                       lora.scale_alpha)
    if gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    if not lora.train_text_encoder:
        return Denoiser(comps.unet)
    return Denoiser(comps.unet, comps.text_encoder, comps.text_encoder_2)


def full_denoiser(comps, train_text_encoder: bool, gradient_checkpointing: bool = False) -> Denoiser:
    """Every UNet weight trains (and the text encoder's with `train_text_encoder`)."""
    comps.unet.requires_grad_(True)
    comps.text_encoder.requires_grad_(train_text_encoder)
    if gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    return Denoiser(comps.unet, comps.text_encoder if train_text_encoder else None)


def export_lora_artifact(module: Denoiser, out_dir: Path, card: dict, formats: list[str]) -> Path:
    """The LoRA artifact of a LoRA denoiser (`export_lora`) plus each of `export.formats` in
    artifact/<format>/, beside the artifact's own file so they travel with it."""
    from diffray.models.adapters import export_lora
    from diffray.models.lora_formats import export_artifact

    out = export_lora(out_dir, module.unet, module.text_encoder, card, module.text_encoder_2)
    for fmt in formats:
        export_artifact(out, fmt, out / fmt)
    return out


def export_pipeline(family, comps, module: Denoiser, out_dir: Path, card: dict) -> Path:
    """A full pipeline dir (`StableDiffusionPipeline.from_pretrained` loads it) with the trained UNet (and
    text encoder, when it trained) plus the card: the artifact of full fine-tuning (DreamBooth full mode,
    `method: full`). Rank 0, weights gathered."""
    from diffray.models.adapters import write_card

    pipe = family.pipeline(comps, unet=module.unet, text_encoder=module.text_encoder)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    write_card(out_dir, card)
    return out_dir


def export_non_ema(module: Denoiser, artifact: Path) -> None:
    """The module's live (trained, non-EMA) parts as the `non_ema` variant files of a pipeline dir."""
    module.unet.save_pretrained(Path(artifact) / "unet", variant="non_ema", safe_serialization=True)
    if module.text_encoder is not None:
        module.text_encoder.save_pretrained(Path(artifact) / "text_encoder", variant="non_ema",
                                            safe_serialization=True)


class DenoisingTask(StepTask):
    """A denoising method in the shared loop (see `diffray.trainers.loop.Task`)."""

    def __init__(self, cfg, model_path: str, env: session.WorkerEnv):
        self.cfg, self.env = cfg, env
        self.family = family_of(model_path)
        self.comps = self.family.load(model_path)
        self.module = speed.apply_to_children(self.build_module().to(env.device), cfg.train)
        self.comps.vae.requires_grad_(False)
        session.place_frozen(self.comps.vae, env)
        if not self.trains_text_encoder:
            session.place_frozen(self.comps.text_encoder, env)
        if self.comps.text_encoder_2 is not None and not self.trains_text_encoder:
            session.place_frozen(self.comps.text_encoder_2, env)
        self.prediction_type = self.family.prediction_type(self.comps, cfg.model.prediction_type)
        self.empty = self.empty_prompt() if cfg.data.caption_dropout > 0 else None
        self.counters = session.EncoderCalls(self.comps)
        self.streams: dict = {}
        self.data_time = 0.0  # seconds this step waited for micro-batches

    # --- what a method declares
    trains_text_encoder = False  # True: the text encoder is in the engine's module and takes token ids

    def build_module(self) -> torch.nn.Module:
        """The module the engine trains (its requires_grad parameters), built on `self.comps`."""
        raise NotImplementedError

    def export(self, out_dir: Path, card: dict) -> Path:
        """Write the artifact into out_dir (rank 0, trainable weights gathered; EMA ones when on)."""
        raise NotImplementedError


    @property
    def datasets(self) -> tuple[str, ...]:
        """The named datasets this method streams (see `Method.dataset_sources`)."""
        return ("train",)

    def prompt_ids(self, batch: dict, step: int) -> torch.Tensor:
        """Caption token ids of a batch (the dataset's by default; tags shuffled with `data.shuffle_tags`)."""
        d = self.cfg.data
        if not d.shuffle_tags:
            return batch["input_ids"]
        from diffray.data.captions import comma_token_id, shuffle_batch

        tok = self.comps.tokenizer
        ids = shuffle_batch(batch["input_ids"].cpu().numpy(), batch["sample_id"].tolist(), step, self.cfg.run.seed,
                            comma_token_id(tok), tok.eos_token_id, d.keep_tokens)
        return torch.from_numpy(ids)

    def forward_inputs(self, batch: dict, step: int, dropout: bool) -> dict:
        """Extra inputs of the module's forward (none by default)."""
        return {}

    def next_batch(self, name: str) -> dict:
        """The next micro-batch of stream `name`; the wait counts into the step's `data_time` metric."""
        t0 = time.perf_counter()
        batch = next(self.streams[name])
        self.data_time += time.perf_counter() - t0
        return batch

    def loss(self, engine, step: int) -> torch.Tensor:
        """The loss of the next micro-batch."""
        batch = self.next_batch("train")
        return batch_mean(self.losses(engine, batch, step), batch.get("loss_mask"))

    def after_optimizer_step(self) -> None:
        """Hook after each optimizer step (Textual Inversion restores frozen rows)."""

    # --- the loop's side of the Task protocol (the rest: `StepTask`)
    def start(self, engine, state: dict) -> None:
        """Open the dataset streams, skipping the micro-batches earlier (resumed) steps consumed."""
        skip = state["step"] * self.grad_accum_steps
        self.streams = {name: session.data_stream(name, self.cfg, self.env, skip) for name in self.datasets}

    def train_step(self, engine, step: int) -> session.StepOutput:
        """One optimizer step over `grad_accum_steps` micro-batches. The loss is averaged over ranks before
        backward, so a non-finite loss stops every rank at the same step."""
        self.counters.take()  # drop calls made outside training steps (validation, set-up)
        self.data_time = 0.0
        total = session.accumulated_step(engine, step, self.grad_accum_steps, lambda: self.loss(engine, step),
                                         self.after_optimizer_step)
        return session.StepOutput(total, {**self.counters.take(), "data_time": self.data_time})

    # --- the denoising loss
    def losses(self, engine, batch: dict, step: int, dropout: bool = True) -> torch.Tensor:
        """Per-sample denoising losses [B] of a micro-batch {sample_id, pixel_values | latent_mean +
        latent_std, input_ids[, prompt_embeds, loss_mask, ...]} (with `loss_mask` only masked pixels count).

        Noise, timestep, VAE sample and caption dropout of each row are keyed by (run seed, step,
        sample_id), so a row's loss does not depend on which batch or rank it lands in. `dropout=False`
        (held-out losses) turns caption and control-image dropout off.
        """
        cfg, env = self.cfg, self.env
        n = self.family.noised(self.comps, batch, env.device, env.dtype, step, cfg.run.seed, cfg.train.noise_offset,
                               cfg.train.timestep_range, flow=cfg.flow)
        text = self.text_inputs(batch, step, cfg.data.caption_dropout if dropout else 0.0, self.pixel_size(n.noisy))
        pred = engine(n.noisy, n.timesteps, **text, **self.family.forward_kwargs(cfg),
                      **self.forward_inputs(batch, step, dropout))
        target = self.family.target(self.comps, n, self.prediction_type)
        return per_sample_loss(pred, target, n.timesteps, self.comps.noise_scheduler, self.prediction_type,
                               cfg.train.snr_gamma, batch.get("loss_mask"))

    def pixel_size(self, latents: torch.Tensor) -> tuple[int, int]:
        """The image (H, W) of latents [B, C, h, w] (the VAE's scale)."""
        scale = 2 ** (len(self.comps.vae.config.block_out_channels) - 1)
        return latents.shape[-2] * scale, latents.shape[-1] * scale

    def text_inputs(self, batch: dict, step: int, caption_dropout: float, size: tuple[int, int]) -> dict:
        """Token ids when the text encoder trains in the engine; otherwise frozen conditioning (states, and
        the family's added inputs for images of `size`), from the latent cache or encoded here without grad.
        Dropped captions become the empty caption."""
        device = self.env.device
        drop = caption_dropout_mask([int(i) for i in batch["sample_id"]], step, self.cfg.run.seed,
                                    caption_dropout).to(device)
        if drop.any() and self.empty is None:
            self.empty = self.empty_prompt()
        input_ids = self.prompt_ids(batch, step).to(device)
        if drop.any():
            rows = drop.view(-1, *(1,) * (input_ids.dim() - 1))  # ids are [B, 77], or [B, 2, 77] for SDXL
            input_ids = torch.where(rows, self.empty["input_ids"][None], input_ids)
        if self.trains_text_encoder:
            if self.comps.text_encoder_2 is None:
                return {"input_ids": input_ids}
            like = torch.empty(len(input_ids), device=device, dtype=self.env.dtype)
            return {"input_ids": input_ids, "time_ids": self.family.time_ids(batch, size, like)}
        if "prompt_embeds" not in batch or self.cfg.data.shuffle_tags:  # cached states are of the unshuffled ids
            with torch.no_grad():
                return self.family.conditioning(self.comps, input_ids, batch, size)
        hidden, pooled = (batch[k].to(device, self.env.dtype) for k in ("prompt_embeds", "pooled_prompt_embeds"))
        if drop.any():
            hidden = torch.where(drop[:, None, None], self.empty["hidden"][None].to(hidden.dtype), hidden)
            pooled = torch.where(drop[:, None], self.empty["pooled"][None].to(pooled.dtype), pooled)
        return self.family.states_conditioning(self.comps, hidden, pooled, batch, size)

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """Token ids ([77]; [2, 77] for SDXL, [77 + L] for Flux) and, for the latent cache's rows, the frozen
        states and pooled output of the empty caption (caption dropout), as the family's `text_states`."""
        ids = self.family.tokenize(self.comps, [""]).to(self.env.device)
        with torch.no_grad():
            hidden, pooled = self.family.text_states(self.comps, ids)
        return {"input_ids": ids[0], "hidden": hidden[0], "pooled": pooled[0]}

    # --- validation
    def validation_loss(self, engine, batch: dict) -> torch.Tensor:
        """Mean loss of a held-out micro-batch at fixed noise/timesteps, no dropout."""
        return batch_mean(self.losses(engine, batch, session.VALIDATION_STEP, dropout=False), batch.get("loss_mask"))

    def validation_grid(self, step: int):
        """One row of `train.validation_prompts` rendered with the current weights (None without prompts:
        `validation_prompts: []` turns the grid off as `validation_grids: false` does)."""
        from diffray.images import make_grid

        prompts = self.cfg.train.validation_prompts
        return make_grid([self.render(prompts)]) if prompts else None

    def render(self, prompts: list[str]) -> list:
        """Images of `prompts` (seeds run seed + i) with the family's validation sampler (DDIM for the
        UNet families) and the live weights."""
        pipe = self.family.pipeline(self.comps, unet=self.comps.unet, scheduler=self.family.sampler(self.comps))
        steps, seed = self.cfg.train.validation_inference_steps, self.cfg.run.seed
        extra = self.family.render_args(self.comps, self.cfg.data.resolution)
        return [pipe(p, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed + i),
                     output_type="pil", **extra).images[0] for i, p in enumerate(prompts)]
