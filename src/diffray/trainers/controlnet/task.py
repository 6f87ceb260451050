"""ControlNet on the shared denoising base. The engine wraps `ControlledUNet` (ControlNet + frozen UNet),
so DeepSpeed ZeRO shards the ControlNet's weights, gradients and optimizer state across workers; only
the ControlNet has requires_grad. The loss is the base's keyed denoising loss with the control images
as extra inputs, blanked per sample by `controlnet.conditioning_dropout`. Validation renders with the
family's ControlNet pipeline (`StableDiffusionControlNetPipeline`, or the SDXL one) on the live modules;
the artifact is `save_pretrained` + the card. For SDXL, the size/pooled-text conditioning reaches both
the ControlNet and the UNet.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffray.models.adapters import write_card
from diffray.models.loading import load_controlnet
from diffray.trainers.components.diffusion import caption_dropout_mask
from diffray.trainers.denoising import DenoisingTask

CONTROL_DROPOUT_KEY = 1_299_709  # keeps control-image dropout draws apart from caption dropout's


class ControlledUNet(torch.nn.Module):
    """ControlNet residuals added to a frozen UNet's down and mid blocks: the module the engine trains."""

    def __init__(self, controlnet: torch.nn.Module, unet: torch.nn.Module):
        super().__init__()
        self.controlnet = controlnet
        self.unet = unet

    def forward(self, noisy_latents, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0,
                added_cond_kwargs=None):
        down, mid = self.controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                    controlnet_cond=controlnet_cond, conditioning_scale=conditioning_scale,
                                    added_cond_kwargs=added_cond_kwargs, return_dict=False)
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                         added_cond_kwargs=added_cond_kwargs, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid).sample


def build_controlnet(cfg, unet) -> torch.nn.Module:
    """`controlnet.init_from` loaded, or a new ControlNet copying the UNet's encoder (zero convolutions)."""
    from diffusers import ControlNetModel

    if cfg.controlnet.init_from:
        return load_controlnet(cfg.controlnet.init_from)
    torch.manual_seed(cfg.run.seed)  # the control-image encoder's non-zero layers: same on every rank and run
    return ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=tuple(cfg.controlnet.conditioning_embedding_out_channels))


def validation_controls(cfg) -> list[tuple[Any, str]]:
    """(control image, prompt) pairs for validation grids: `controlnet.validation_images` with
    `train.validation_prompts` (cycled), else the first two rows of a local imagefolder dataset, else a
    blank control image."""
    from PIL import Image

    from diffray.data import resolve_data_path
    from diffray.data.transforms import decode_image

    def control(path: Path):
        return decode_image(path.read_bytes(), str(path), background=(0, 0, 0))

    prompts = cfg.train.validation_prompts or ["a photo"]
    if cfg.controlnet.validation_images:
        return [(control(Path(p)), prompts[i % len(prompts)]) for i, p in enumerate(cfg.controlnet.validation_images)]
    root = Path(resolve_data_path(cfg.data.path))
    meta = root / "metadata.jsonl"
    if not meta.is_file():  # Parquet or a remote dataset: a blank control image
        size = (cfg.data.resolution, cfg.data.resolution)
        return [(Image.new("RGB", size), prompts[0])]
    rows = [json.loads(line) for line in meta.read_text().splitlines()[:2]]
    return [(control(root / r[cfg.data.conditioning_column]), str(r.get(cfg.data.caption_column) or prompts[0]))
            for r in rows]


def render_controlled(family, comps, controlnet, unet, pairs: list[tuple[Any, str]], resolution: int, steps: int,
                      seed: int, scale: float = 1.0) -> list[list]:
    """Rows [control image, generated image] from the current weights (DDIM, seeds seed+i), by the family's
    ControlNet pipeline."""
    from diffusers import DDIMScheduler
    from PIL import Image

    pipe = family.controlnet_pipeline(comps, controlnet, unet, DDIMScheduler.from_config(comps.noise_scheduler.config))
    rows = []
    for i, (image, prompt) in enumerate(pairs):
        image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        out = pipe(prompt, image=image, num_inference_steps=steps, height=resolution, width=resolution,
                   controlnet_conditioning_scale=scale, generator=torch.Generator().manual_seed(seed + i)).images[0]
        rows.append([image, out])
    return rows


def conditioning_info(data_path: str) -> dict | None:
    """What made the control images (the card's `conditioning`): `diffray data condition`'s conditioning.json,
    or a world set's dataset.json (builtin:world/canny); None when the dataset does not say."""
    from diffray.data import resolve_data_path

    root = Path(resolve_data_path(data_path))
    if (root / "conditioning.json").is_file():
        return json.loads((root / "conditioning.json").read_text())
    made = json.loads((root / "dataset.json").read_text()) if (root / "dataset.json").is_file() else {}
    return {"source": data_path, "type": made["conditioning"], "options": {}} if "conditioning" in made else None


class ControlNetTask(DenoisingTask):
    """ControlNet in the shared loop."""

    _pairs: list | None = None

    def build_module(self) -> ControlledUNet:
        for frozen in (self.comps.unet, self.comps.vae, self.comps.text_encoder, self.comps.text_encoder_2):
            if frozen is not None:
                frozen.requires_grad_(False)
        controlnet = build_controlnet(self.cfg, self.comps.unet)
        controlnet.requires_grad_(True)
        controlnet.train()
        if self.cfg.train.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        return ControlledUNet(controlnet, self.comps.unet)

    def forward_inputs(self, batch: dict, step: int, dropout: bool) -> dict:
        """The control images (blank for the rows `conditioning_dropout` drops) and their scale."""
        cond = batch["conditioning_pixel_values"].to(self.env.device)
        if dropout:
            drop = caption_dropout_mask([int(i) for i in batch["sample_id"]], step,
                                        self.cfg.run.seed + CONTROL_DROPOUT_KEY,
                                        self.cfg.controlnet.conditioning_dropout).to(self.env.device)
            if drop.any():
                cond = torch.where(drop[:, None, None, None], torch.zeros_like(cond), cond)
        return {"controlnet_cond": cond, "conditioning_scale": self.cfg.controlnet.conditioning_scale}

    def validation_grid(self, step: int):
        from diffray.images import make_grid

        if self._pairs is None:
            self._pairs = validation_controls(self.cfg)
        t, cn = self.cfg.train, self.cfg.controlnet
        return make_grid(render_controlled(self.family, self.comps, self.module.controlnet, self.module.unet,
                                           self._pairs, self.cfg.data.resolution, t.validation_inference_steps,
                                           self.cfg.run.seed, cn.conditioning_scale))

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        self.module.controlnet.save_pretrained(out_dir, safe_serialization=True)
        write_card(out_dir, {**card, "conditioning": conditioning_info(self.cfg.data.path),
                             "conditioning_scale": self.cfg.controlnet.conditioning_scale})
        return out_dir
