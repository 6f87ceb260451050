"""LoRA on the shared denoising base: what trains is a LoRA adapter (UNet, optionally text encoder);
what is exported is `pytorch_lora_weights.safetensors` + the card."""

from __future__ import annotations

from pathlib import Path

from diffray.trainers.denoising import DenoisingTask, Denoiser, export_lora_artifact, lora_denoiser


class LoraTask(DenoisingTask):
    """LoRA text-to-image in the shared loop."""

    @property
    def trains_text_encoder(self) -> bool:
        return self.cfg.lora.train_text_encoder

    def build_module(self) -> Denoiser:
        return lora_denoiser(self.comps, self.cfg.lora, self.cfg.run.seed, self.cfg.train.gradient_checkpointing)

    def export(self, out_dir: Path, card: dict) -> Path:
        return export_lora_artifact(self.module, out_dir, card, self.cfg.export.formats)
