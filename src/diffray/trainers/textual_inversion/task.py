"""Textual Inversion on the shared denoising base. The engine trains the text encoder's input embedding
matrix (the module takes token ids); a `RowGuard` masks the gradient of the old rows and writes them back
after every optimizer step and after a resume (as the reference implementations do), which works
unchanged under DDP and DeepSpeed ZeRO 0-2. Captions come from the object/style prompt templates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from diffray.data.transforms import tokenize_captions
from diffray.models.textual_inversion import (
    TI_WEIGHTS,
    RowGuard,
    add_placeholder_tokens,
    export_textual_inversion,
    placeholder_text,
    placeholder_tokens,
)
from diffray.trainers.components.prompts import template_prompts
from diffray.trainers.denoising import DenoisingTask, Denoiser


def build_model(cfg, comps) -> tuple[Denoiser, list[int]]:
    """Add the placeholder token(s) (rows initialised from the initializer token) and freeze everything
    but the input embeddings. Returns the module and the new token ids (identical on every rank)."""
    ti = cfg.textual_inversion
    token_ids = add_placeholder_tokens(comps.tokenizer, comps.text_encoder, ti.placeholder_token,
                                       ti.initializer_token, ti.num_vectors)
    comps.unet.requires_grad_(False)
    comps.text_encoder.requires_grad_(False)
    comps.text_encoder.get_input_embeddings().weight.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    return Denoiser(comps.unet, comps.text_encoder), token_ids


def card_fields(cfg) -> dict:
    """What a user needs to load and prompt the artifact."""
    ti = cfg.textual_inversion
    return {"placeholder_token": ti.placeholder_token, "num_vectors": ti.num_vectors,
            "tokens": placeholder_tokens(ti.placeholder_token, ti.num_vectors), "weight_name": TI_WEIGHTS,
            "usage": f"pipe.load_textual_inversion(dir, weight_name={TI_WEIGHTS!r}); write "
                     f"{ti.placeholder_token!r} in prompts (diffusers expands multi-vector tokens itself)"}


class TextualInversionTask(DenoisingTask):
    """Textual Inversion in the shared loop."""

    trains_text_encoder = True
    token_ids: list[int]  # set by build_module

    def __init__(self, cfg, model_path: str, env):
        super().__init__(cfg, model_path, env)
        # Saved before the engine restores a checkpoint: a resumed optimizer's master copy may carry
        # weight-decayed old rows into the weight, which `start` undoes.
        self.guard = RowGuard(self.comps.text_encoder.get_input_embeddings().weight, self.token_ids).register()

    def build_module(self) -> Denoiser:
        module, self.token_ids = build_model(self.cfg, self.comps)
        return module

    def prompt_ids(self, batch: dict, step: int) -> torch.Tensor:
        """A template caption per row ("a photo of a <tok>", ...), drawn per (seed, step, sample)."""
        ti = self.cfg.textual_inversion
        prompts = template_prompts(ti.learnable_property, placeholder_text(ti.placeholder_token, ti.num_vectors),
                                   [int(i) for i in batch["sample_id"]], step, self.cfg.run.seed)
        return torch.from_numpy(tokenize_captions(self.comps.tokenizer, prompts))

    def start(self, engine, state: dict) -> None:
        self.guard.restore()
        super().start(engine, state)

    def after_optimizer_step(self) -> None:
        self.guard.restore()

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        return export_textual_inversion(out_dir, self.comps.text_encoder, self.token_ids,
                                        self.cfg.textual_inversion.placeholder_token, {**card, **card_fields(self.cfg)})
