"""Full fine-tuning on the shared denoising base: every UNet weight (and optionally the text encoder's)
is in the engine, so ZeRO shards its optimizer state (and with stage 3 the weights); the artifact is a
whole pipeline dir with the trained parts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffray.trainers.denoising import DenoisingTask, Denoiser, export_non_ema, export_pipeline, full_denoiser


def fresh(module: torch.nn.Module) -> torch.nn.Module:
    """A newly initialised module of the same class and config (diffusers `from_config`, transformers
    `Cls(config)`), drawn from the global torch RNG."""
    if hasattr(type(module), "from_config"):
        return type(module).from_config(module.config)
    return type(module)(module.config)


def reinitialise(comps, text_encoder: bool, seed: int) -> None:
    """Replace the UNet (and the text encoder) in `comps` by fresh ones seeded by `seed`, so every rank
    builds the same weights; the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        comps.unet = fresh(comps.unet)
        if text_encoder:
            torch.manual_seed(seed + 1)
            comps.text_encoder = fresh(comps.text_encoder)


class FullTask(DenoisingTask):
    """`method: full` in the shared loop."""

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.full.train_text_encoder

    def build_module(self) -> Denoiser:
        full, t = self.cfg.full, self.cfg.train
        if full.from_scratch:
            reinitialise(self.comps, full.train_text_encoder, self.cfg.run.seed)
        return full_denoiser(self.comps, full.train_text_encoder, t.gradient_checkpointing)

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        full = self.cfg.full
        card = {**card, "train_text_encoder": full.train_text_encoder, "from_scratch": full.from_scratch}
        return export_pipeline(self.family, self.comps, self.module, out_dir, card)

    def export_raw(self, artifact: Path) -> None:
        """The trained weights as the diffusers `non_ema` variant beside the EMA pipeline
        (`UNet2DConditionModel.from_pretrained(dir, subfolder="unet", variant="non_ema")`)."""
        export_non_ema(self.module, artifact)
