"""Textual Inversion exports: a TI artifact (`learned_embeds.safetensors` + card) as the embedding file that
AUTOMATIC1111 and ComfyUI take from their `embeddings/` folder (`kohya`), or as it is (`diffusers`).

The kohya layout is what sd-scripts writes and A1111/ComfyUI/diffusers read: SD 1.x/2.x `{"emb_params": [n, dim]}`,
SDXL `{"clip_l": [n, 768], "clip_g": [n, 1280]}`. A1111 and ComfyUI name an embedding by its FILE NAME (the tensor
key says nothing), so the file is `<name>.safetensors`, the name made from the placeholder token (`embedding_name`),
and it is what a user writes in prompts there. Everything is checked before anything is written, into an OUT
replaced whole (`export_io`), as the LoRA export does. Never imports ray.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffray.errors import AdapterError, ConfigError
from diffray.models.export_io import (CARD, check_out, kohya_base_version, model_name, modelspec, read_card_file,
                                      replaced_dir, sd_base, write_export_card)
from diffray.models.textual_inversion import SDXL_KEYS, TI_WEIGHTS

TI_FORMATS = ("kohya", "diffusers")  # peft has no embedding layout
A1111_KEY = "emb_params"  # the one tensor of an SD 1.x/2.x embedding file (sd-scripts' name; A1111 reads any one key)
# Names Windows gives to devices: `con.safetensors` cannot be made there, whatever the extension
_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"{d}{i}" for d in ("com", "lpt") for i in range(1, 10))}


def is_ti_artifact(folder: Path) -> bool:
    """Whether `folder` holds a Textual Inversion artifact's embedding file."""
    return (folder / TI_WEIGHTS).is_file()


def embedding_name(token: str, source: str | Path) -> str:
    """The file stem (A1111's and ComfyUI's embedding name) of `token`: its ASCII letters, digits, '_', '-' and '.'
    (`<star>` -> `star`), without leading or trailing dots (a hidden file; Windows drops a trailing one).

    Raises:
        AdapterError: naming `source` and `placeholder_token`, when nothing is left, more than 100 characters
            are, or the name is a Windows device name (con, nul, com1, ...).
    """
    name = re.sub(r"[^A-Za-z0-9_.-]", "", token).strip(".")
    if not name or len(name) > 100 or name.split(".")[0].lower() in _WINDOWS_DEVICES:
        why = "a Windows device name" if name and len(name) <= 100 else \
            "more than 100 characters" if name else "no letters, digits, '_' or '-'"
        raise AdapterError(f"{source}: placeholder_token {token!r} cannot name the embedding file ({why} once "
                           "the characters a file name cannot hold are dropped); A1111 and ComfyUI name an "
                           "embedding by its file, so train with a token such as '<my-concept>'")
    return name


def read_embedding(weights_file: Path, card: dict, card_file: Path) -> tuple[str, dict[str, torch.Tensor], str]:
    """(placeholder token, tensors in the kohya layout, family) of a TI artifact's file: one token's [n, dim]
    (SD 1.x/2.x; the token is its key) or SDXL's clip_l/clip_g (the token is the card's `placeholder_token`).

    Raises:
        ConfigError: the file is not safetensors, or holds neither layout.
        AdapterError: the card names no token for an SDXL file, or a `family` the file does not fit.
    """
    try:  # not lora_formats.read_safetensors: lora_formats hands TI artifacts to this module
        tensors = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for one cause: a bad file
        raise ConfigError(f"{weights_file}: not a readable safetensors file ({type(exc).__name__})") from None
    xl = set(tensors) == set(SDXL_KEYS)
    if xl:
        token = card.get("placeholder_token")
        if not isinstance(token, str) or not token:
            raise AdapterError(f"{card_file}: placeholder_token must name the token of this SDXL embedding "
                               f"({', '.join(SDXL_KEYS)}), not {token!r}")
        out = {k: tensors[k] for k in SDXL_KEYS}
    elif len(tensors) == 1:
        token, vectors = next(iter(tensors.items()))
        out = {A1111_KEY: vectors.unsqueeze(0) if vectors.dim() == 1 else vectors}
    else:
        raise ConfigError(f"{weights_file}: holds {sorted(tensors)[:4]}; a Textual Inversion file holds one token's "
                          f"vectors or SDXL's {' and '.join(SDXL_KEYS)}")
    counts = {v.shape[0] if v.dim() == 2 else -1 for v in out.values()}
    if len(counts) != 1 or -1 in counts or not counts.pop():
        raise ConfigError(f"{weights_file}: each embedding must be [vectors, dim] with the same vectors, not "
                          f"{ {k: list(v.shape) for k, v in tensors.items()} }")
    family = "stable-diffusion-xl" if xl else "stable-diffusion"
    if card.get("family", family) != family:
        raise AdapterError(f"{card_file}: family {card.get('family')!r}, but {weights_file.name} holds a "
                           f"{family} embedding ({', '.join(sorted(tensors))})")
    return token, {k: v.contiguous() for k, v in out.items()}, family


def embedding_metadata(card: dict, family: str, name: str, token: str, vectors: int) -> dict[str, str]:
    """The file's metadata: SAI ModelSpec (`<base>/textual-inversion`, trigger phrase = the file's name), kohya's
    `ss_base_model_version`/`ss_v2`/`ss_sd_model_name` (as the LoRA export), and the token as trained."""
    meta = {"format": "pt", "ss_base_model_version": kohya_base_version(card, family),
            "ss_v2": str(family == "stable-diffusion" and sd_base(card)[0] == 2),
            "diffray.placeholder_token": token, "diffray.num_vectors": str(vectors)}
    if model_name(card.get("base_model")):
        meta["ss_sd_model_name"] = model_name(card.get("base_model"))
    return {**meta, **modelspec(card, family, name, adapter="textual-inversion", trigger=name)}


def usage(name: str, xl: bool) -> str:
    """How the exported file is used (the exported card's `usage`)."""
    diffusers = (f"diffusers: sd = safetensors.torch.load_file('{name}.safetensors'); pipe.load_textual_inversion("
                 f"sd['clip_l'], token='{name}', text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer), the same "
                 "with sd['clip_g'], pipe.text_encoder_2, pipe.tokenizer_2" if xl else
                 f"diffusers: pipe.load_textual_inversion('{name}.safetensors', token='{name}')")
    return (f"A1111: put {name}.safetensors in stable-diffusion-webui/embeddings and write '{name}' in prompts; "
            f"ComfyUI: put it in models/embeddings and write 'embedding:{name}'; {diffusers}")


def export_ti_artifact(src: Path, fmt: str, out: Path) -> Path:
    """Write the TI artifact `src` in `fmt` (`TI_FORMATS`) into `out`, with its card made public. Everything is
    checked before anything is written; `out` is replaced whole, only when the export is complete.

    Raises:
        ConfigError: a format a TI has no layout in (naming `format`), `out` refused by `check_out`, an unreadable
            or unknown embedding file.
        AdapterError: the card is no JSON object, names no token for SDXL, or one that names no file.
        StorageError: out cannot be created or written.
    """
    if fmt not in TI_FORMATS:
        raise ConfigError(f"{src} is a Textual Inversion embedding, which has no {fmt!r} layout; its formats are "
                          "kohya (the A1111/ComfyUI embedding file) and diffusers (the file as is)", field="format")
    check_out(src, out)
    card_file, weights_file = src / CARD, src / TI_WEIGHTS
    card = read_card_file(card_file)
    token, tensors, family = read_embedding(weights_file, card, card_file)
    if fmt == "kohya":
        name = embedding_name(token, card_file if family == "stable-diffusion-xl" else weights_file)
        meta = embedding_metadata(card, family, name, token, next(iter(tensors.values())).shape[0])
        card = {**card, "weight_name": f"{name}.safetensors", "usage": usage(name, family == "stable-diffusion-xl")}
    with replaced_dir(out, f"{fmt} export") as tmp:
        if fmt == "kohya":
            save_file(tensors, str(tmp / card["weight_name"]), metadata=meta)
        else:
            shutil.copyfile(weights_file, tmp / TI_WEIGHTS)
        write_export_card(tmp, card, fmt)
    return out
