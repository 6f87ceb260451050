"""Textual Inversion embeddings: placeholder tokens added to a CLIP tokenizer + text encoder, the row
guard that keeps every other embedding bit-identical while one matrix trains, and the artifact.

The artifact is diffusers' `learned_embeds.safetensors`: one key, the placeholder token, holding a
[num_vectors, dim] tensor; stock `pipe.load_textual_inversion(dir, weight_name=TI_WEIGHTS)` reads it and
expands a multi-vector token into `<tok> <tok>_1 ...` in prompts by itself. For SDXL (two encoders) the
file holds `clip_l` and `clip_g` (the first and second encoder's vectors), the layout diffusers documents
for SDXL embeddings: each is loaded with `load_textual_inversion(state_dict[key], token=..., text_encoder=,
tokenizer=)`. Never imports ray.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffray.errors import AdapterError, ConfigError
from diffray.models.adapters import write_card

TI_WEIGHTS = "learned_embeds.safetensors"
SDXL_KEYS = ("clip_l", "clip_g")  # an SDXL embedding file: the first and the second text encoder's vectors


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """`<tok>`, `<tok>_1`, ... : the names diffusers' loader gives the vectors of a multi-vector token."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def placeholder_text(placeholder: str, num_vectors: int) -> str:
    """What stands for the concept in a training prompt: every vector's token, space separated."""
    return " ".join(placeholder_tokens(placeholder, num_vectors))


def word_ends(tokenizer) -> Callable[[int], bool]:
    """Whether a token id ends a word: CLIP's BPE marks each word's last token with `</w>`; special and added
    tokens stand alone."""
    alone = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return lambda i: i in alone or tokenizer.convert_ids_to_tokens(i).endswith("</w>")


def substitute_tokens(ids: torch.Tensor, word_ids: Sequence[int], new_ids: Sequence[int], eos_id: int, pad_id: int,
                      word_end: Callable[[int], bool] = lambda i: True) -> torch.Tensor:
    """Token ids [B, L] of padded captions (BOS, tokens, EOS, padding) with every occurrence of the word whose
    ids are `word_ids` replaced by `new_ids`, re-padded to L (a caption that grows past L loses its last tokens
    before the EOS, as the tokenizer truncates). CLIP's BPE splits words apart before merging, so a whole word
    has the same ids wherever it stands; an occurrence counts only where a word starts (after BOS or a token
    for which `word_end` holds), so 'star' is not found at the end of 'superstar'."""
    word, new, length = list(word_ids), list(new_ids), ids.shape[-1]
    rows = []
    for row in ids.tolist():
        end = row.index(eos_id, 1) if eos_id in row[1:] else length
        body, out, i = row[1:end], [], 0
        while i < len(body):
            if body[i:i + len(word)] == word and (i == 0 or word_end(body[i - 1])):
                out += new
                i += len(word)
            else:
                out.append(body[i])
                i += 1
        out = out[:length - 2]
        rows.append([row[0], *out, eos_id] + [pad_id] * (length - 2 - len(out)))
    return torch.tensor(rows, dtype=ids.dtype, device=ids.device)


def has_word(tokenizer, caption: str, word: str) -> bool:
    """Whether `caption`, tokenized as training does (77 tokens), holds `word` where `substitute_tokens` finds
    it. A placeholder written in a caption needs spaces around it: `<tok>,` splits as `<`, `tok`, `>,`."""
    from diffray.data.transforms import tokenize_captions

    ids = torch.from_numpy(tokenize_captions(tokenizer, [caption], None))
    out = substitute_tokens(ids, tokenizer.encode(word, add_special_tokens=False), [-1], tokenizer.eos_token_id,
                            tokenizer.pad_token_id, word_ends(tokenizer))
    return bool((out == -1).any())


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
                             placeholder: str, card: dict[str, Any], text_encoder_2: torch.nn.Module | None = None,
                             token_ids_2: list[int] | None = None) -> Path:
    """Write `learned_embeds.safetensors` ({placeholder: [n, dim]}, or SDXL's {clip_l, clip_g} with a second
    encoder) and a JSON card into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {placeholder: learned_embeddings(text_encoder, token_ids)}
    if text_encoder_2 is not None:
        tensors = dict(zip(SDXL_KEYS, (tensors[placeholder], learned_embeddings(text_encoder_2, token_ids_2))))
    save_file(tensors, str(out / TI_WEIGHTS), metadata={"format": "pt"})
    write_card(out, card)
    return out


def stored_token(adapter_dir: str | Path) -> str:
    """The placeholder token a TI artifact is written with in prompts: the file's one key, or for an SDXL
    file (`clip_l`/`clip_g`) the card's `placeholder_token`.

    Raises:
        AdapterError: the file or the card names no token.
    """
    from safetensors import safe_open

    from diffray.models.adapters import read_card

    d = Path(adapter_dir)
    try:
        with safe_open(str(d / TI_WEIGHTS), "pt") as f:
            keys = list(f.keys())
    except (OSError, RuntimeError, ValueError) as exc:
        raise AdapterError(f"{d / TI_WEIGHTS}: cannot be read: {exc}") from None
    token = read_card(d).get("placeholder_token") if set(keys) == set(SDXL_KEYS) else keys[0] if len(keys) == 1 \
        else None
    if not isinstance(token, str) or not token:
        raise AdapterError(f"{d}: its card names no placeholder_token" if set(keys) == set(SDXL_KEYS) else
                           f"{d / TI_WEIGHTS}: must hold exactly one token, holds {len(keys)}")
    return token


def load_textual_inversion(pipe, adapter_dir: str | Path, as_token: str | None = None):
    """`pipe.load_textual_inversion` on a diffray TI dir; the token is the one stored in the file, or for
    an SDXL file the card's `placeholder_token`, loaded into both encoders (`as_token` loads it under
    another name). An SDXL file on a one-encoder model, or a one-encoder file on SDXL, is an AdapterError."""
    from safetensors import safe_open

    d = Path(adapter_dir)
    xl_model = getattr(pipe, "text_encoder_2", None) is not None
    try:
        with safe_open(str(d / TI_WEIGHTS), "pt") as f:
            keys = set(f.keys())
            xl_file = keys == set(SDXL_KEYS)
            if xl_file != xl_model:
                raise ValueError(f"an embedding for {'two' if xl_file else 'one'} text encoder(s) ({sorted(keys)}), "
                                 f"this model has {'two' if xl_model else 'one'}")
            if not xl_file:
                pipe.load_textual_inversion(str(d), weight_name=TI_WEIGHTS, token=as_token, use_safetensors=True)
                return pipe
            token = as_token or stored_token(d)
            for key, encoder, tokenizer in zip(SDXL_KEYS, (pipe.text_encoder, pipe.text_encoder_2),
                                               (pipe.tokenizer, pipe.tokenizer_2)):
                pipe.load_textual_inversion(f.get_tensor(key), token=token, text_encoder=encoder, tokenizer=tokenizer)
    except (ValueError, KeyError, RuntimeError, OSError) as exc:
        raise AdapterError(f"{d}: cannot load textual inversion into this base model: {exc}") from None
    return pipe
