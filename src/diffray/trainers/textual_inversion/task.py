"""Textual Inversion on the shared denoising base. The engine trains the text encoder's input embedding
matrix (the module takes token ids); a `RowGuard` masks the gradient of the old rows and writes them back
after every optimizer step and after a resume (as the reference implementations do), which works
unchanged under DDP and DeepSpeed ZeRO 0-2. Captions come from the object/style prompt templates, or from
the dataset with the concept word's token ids swapped for the placeholder's.
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
    substitute_tokens,
    word_ends,
)
from diffray.trainers.components.prompts import template_prompts
from diffray.trainers.denoising import DenoisingTask, Denoiser


def encoders(comps) -> list[tuple]:
    """(tokenizer, text encoder) pairs that learn the token: one, or SDXL's two."""
    pairs = [(comps.tokenizer, comps.text_encoder)]
    if comps.text_encoder_2 is not None:
        pairs.append((comps.tokenizer_2, comps.text_encoder_2))
    return pairs


def build_model(cfg, comps) -> tuple[Denoiser, list[list[int]]]:
    """Add the placeholder token(s) to every text encoder (rows initialised from the initializer token) and
    freeze everything but their input embeddings. Returns the module and each encoder's new token ids
    (identical on every rank)."""
    ti = cfg.textual_inversion
    comps.unet.requires_grad_(False)
    token_ids = []
    for tokenizer, encoder in encoders(comps):
        token_ids.append(add_placeholder_tokens(tokenizer, encoder, ti.placeholder_token, ti.initializer_token,
                                                ti.num_vectors))
        encoder.requires_grad_(False)
        encoder.get_input_embeddings().weight.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    return Denoiser(comps.unet, comps.text_encoder, comps.text_encoder_2), token_ids


def card_fields(cfg, sdxl: bool = False) -> dict:
    """What a user needs to load and prompt the artifact."""
    ti = cfg.textual_inversion
    tok = ti.placeholder_token
    usage = (f"pipe.load_textual_inversion(dir, weight_name={TI_WEIGHTS!r}); write {tok!r} in prompts (diffusers "
             "expands multi-vector tokens itself)")
    if sdxl:
        usage = (f"sd = safetensors.torch.load_file(dir/{TI_WEIGHTS!r}); pipe.load_textual_inversion(sd['clip_l'], "
                 f"token={tok!r}, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer); the same with "
                 f"sd['clip_g'], pipe.text_encoder_2, pipe.tokenizer_2; write {tok!r} in prompts")
    return {"placeholder_token": tok, "num_vectors": ti.num_vectors, "tokens": placeholder_tokens(tok, ti.num_vectors),
            "weight_name": TI_WEIGHTS, "usage": usage}


class TextualInversionTask(DenoisingTask):
    """Textual Inversion in the shared loop."""

    trains_text_encoder = True
    token_ids: list[list[int]]  # per text encoder, set by build_module
    word_ids: list[list[int]]  # per text encoder: the concept word's ids under the base tokenizer (dataset captions)
    word_end: list  # per text encoder: whether a token id ends a word (`word_ends`)

    def __init__(self, cfg, model_path: str, env):
        super().__init__(cfg, model_path, env)
        # Saved before the engine restores a checkpoint: a resumed optimizer's master copy may carry
        # weight-decayed old rows into the weight, which `start` undoes.
        self.guards = [RowGuard(encoder.get_input_embeddings().weight, ids).register()
                       for (_, encoder), ids in zip(encoders(self.comps), self.token_ids)]

    def build_module(self) -> Denoiser:
        word = self.cfg.textual_inversion.caption_word()
        # The word's ids under the base tokenizer(s), as the data pipeline tokenized the captions.
        self.word_ids = [] if word is None else [tok.encode(word, add_special_tokens=False)
                                                 for tok, _ in encoders(self.comps)]
        module, self.token_ids = build_model(self.cfg, self.comps)
        self.word_end = [word_ends(tok) for tok, _ in encoders(self.comps)]
        return module

    def prompt_ids(self, batch: dict, step: int) -> torch.Tensor:
        """A template caption per row ("a photo of a <tok>", ...), drawn per (seed, step, sample); or with
        `captions: dataset` the row's own caption with the concept word's ids replaced by the token's."""
        ti = self.cfg.textual_inversion
        if ti.captions == "dataset":
            ids = super().prompt_ids(batch, step)
            swapped = [substitute_tokens(ids if ids.dim() == 2 else ids[:, k], word, new, tok.eos_token_id,
                                         tok.pad_token_id, end)
                       for k, ((tok, _), word, new, end) in enumerate(zip(encoders(self.comps), self.word_ids,
                                                                          self.token_ids, self.word_end))]
            return swapped[0] if ids.dim() == 2 else torch.stack(swapped, dim=1)
        prompts = template_prompts(ti.learnable_property, placeholder_text(ti.placeholder_token, ti.num_vectors),
                                   [int(i) for i in batch["sample_id"]], step, self.cfg.run.seed)
        return torch.from_numpy(tokenize_captions(self.comps.tokenizer, prompts, self.comps.tokenizer_2))

    def start(self, engine, state: dict) -> None:
        for guard in self.guards:
            guard.restore()
        super().start(engine, state)

    def after_optimizer_step(self) -> None:
        for guard in self.guards:
            guard.restore()

    def export(self, out_dir: Path, card: dict[str, Any]) -> Path:
        from diffray.models.lora_formats import export_artifact

        second = {} if self.comps.text_encoder_2 is None else dict(text_encoder_2=self.comps.text_encoder_2,
                                                                    token_ids_2=self.token_ids[1])
        card = {**card, **card_fields(self.cfg, bool(second))}
        out = export_textual_inversion(out_dir, self.comps.text_encoder, self.token_ids[0],
                                       self.cfg.textual_inversion.placeholder_token, card, **second)
        for fmt in self.cfg.export.formats:  # artifact/<format>/, as a LoRA run's (kohya: the A1111 embedding)
            export_artifact(out, fmt, out / fmt)
        return out
