"""Textual Inversion embeddings: placeholder tokens added to a CLIP tokenizer + text encoder, the row
guard that keeps every other embedding bit-identical while one matrix trains, and the artifact.

The artifact is diffusers' `learned_embeds.safetensors`: one key, the placeholder token, holding a
[num_vectors, dim] tensor; stock `pipe.load_textual_inversion(dir, weight_name=TI_WEIGHTS)` reads it and
expands a multi-vector token into `<tok> <tok>_1 ...` in prompts by itself. Never imports ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffray.errors import AdapterError, ConfigError
from diffray.models.adapters import write_card

TI_WEIGHTS = "learned_embeds.safetensors"


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """`<tok>`, `<tok>_1`, ... : the names diffusers' loader gives the vectors of a multi-vector token."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def placeholder_text(placeholder: str, num_vectors: int) -> str:
    """What stands for the concept in a training prompt: every vector's token, space separated."""
    return " ".join(placeholder_tokens(placeholder, num_vectors))


def check_tokens(tokenizer, placeholder: str, initializer: str, num_vectors: int) -> int:
    """Check the placeholder is new and the initializer is one token; returns the initializer's id.

    Raises:
        ConfigError: naming `textual_inversion.placeholder_token` or `.initializer_token`.
    """
    vocab = tokenizer.get_vocab()  # includes added tokens
    taken = [t for t in placeholder_tokens(placeholder, num_vectors) if t in vocab]
    if taken:
        raise ConfigError(f"{taken[0]!r} is already in the tokenizer's vocabulary; choose a new token such as "
                          "'<my-concept>'", field="textual_inversion.placeholder_token")
    ids = tokenizer.encode(initializer, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(f"{initializer!r} tokenizes to {len(ids)} tokens {pieces}; it must be exactly one token",
                          field="textual_inversion.initializer_token")
    return int(ids[0])


def add_placeholder_tokens(tokenizer, text_encoder: torch.nn.Module, placeholder: str, initializer: str,
                           num_vectors: int) -> list[int]:
    """Add the placeholder token(s) to `tokenizer`, grow the text encoder's input embeddings to match and
    start every new row as a copy of the initializer's embedding. Returns the new token ids.

    Raises:
        ConfigError: see `check_tokens`.
    """
    init_id = check_tokens(tokenizer, placeholder, initializer, num_vectors)
    tokens = placeholder_tokens(placeholder, num_vectors)
    tokenizer.add_tokens(tokens)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    if len(tokenizer) > text_encoder.get_input_embeddings().num_embeddings:
        # mean_resizing would draw random rows we overwrite anyway (and costs a covariance of the table)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = weight[init_id].clone()
    return ids


class RowGuard:
    """Keeps all rows of an embedding matrix but `trainable_ids` equal to a saved copy.

    `mask_gradient` zeroes the other rows' gradient (so clipping and Adam statistics see only the new
    rows); `restore` writes the saved rows back, which undoes what weight decay or an optimizer's master
    copy did to them. Create it from the base weights (before a checkpoint is restored), and call
    `restore` after every optimizer step and after loading a checkpoint.
    """

    def __init__(self, weight: torch.nn.Parameter, trainable_ids: list[int]):
        self.weight = weight
        self.frozen = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        self.frozen[trainable_ids] = False
        self.saved = weight.detach().clone()

    def mask_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(self.frozen.to(grad.device).unsqueeze(1), 0)

    def register(self) -> RowGuard:
        """Mask the weight's gradient from now on (a tensor hook runs before DDP/DeepSpeed see it)."""
        self.weight.register_hook(self.mask_gradient)
        return self

    def restore(self) -> None:
        w = self.weight
        if self.saved.device != w.device or self.saved.dtype != w.dtype:  # an engine moved or cast the weight
            self.saved, self.frozen = self.saved.to(w.device, w.dtype), self.frozen.to(w.device)
        with torch.no_grad():
            w[self.frozen] = self.saved[self.frozen]


def learned_embeddings(text_encoder: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    """The trained vectors [num_vectors, dim] (fp32, CPU) in token order."""
    return text_encoder.get_input_embeddings().weight[token_ids].detach().to("cpu", torch.float32).contiguous()


def export_textual_inversion(out_dir: str | Path, text_encoder: torch.nn.Module, token_ids: list[int],
                             placeholder: str, card: dict[str, Any]) -> Path:
    """Write `learned_embeds.safetensors` ({placeholder: [n, dim]}) and a JSON card into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({placeholder: learned_embeddings(text_encoder, token_ids)}, str(out / TI_WEIGHTS),
              metadata={"format": "pt"})
    write_card(out, card)
    return out


def load_textual_inversion(pipe, adapter_dir: str | Path):
    """`pipe.load_textual_inversion` on a diffray TI dir; the token is the one stored in the file."""
    d = Path(adapter_dir)
    try:
        pipe.load_textual_inversion(str(d), weight_name=TI_WEIGHTS, use_safetensors=True)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise AdapterError(f"{d}: cannot load textual inversion into this base model: {exc}") from None
    return pipe
