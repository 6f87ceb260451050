"""Image and caption transforms for training batches. Pure PIL/numpy (never imports ray).

Random choices (crop offset, flip) are drawn from a generator keyed by (seed, sample_id), so a sample
is transformed the same way whichever worker or batch it lands in.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from diffray.errors import DatasetError


DEFAULT_MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold (about 9459 x 9459)
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def decode_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to RGB: EXIF orientation applied, alpha composited on white, palette/CMYK/1-bit converted,
    16-bit and float grayscale scaled to 8 bits.

    The size in the header is checked against `max_pixels` before any pixel is decoded, so a
    decompression bomb costs nothing. Raises DatasetError naming `source` for empty, undecodable,
    truncated or oversized data.
    """
    if not data:
        raise DatasetError(f"{source}: empty file (0 bytes)")
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # our own limit below, from the header, names the setting
            try:
                img = Image.open(io.BytesIO(data))
            finally:
                Image.MAX_IMAGE_PIXELS = pil_limit
            w, h = img.size
            if w * h > max_pixels:
                raise DatasetError(f"{source}: {w}x{h} = {w * h} pixels exceeds the decompression-bomb limit "
                                   f"data.max_image_pixels={max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img)
    except DatasetError:
        raise
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{source}: exceeds the decompression-bomb limit ({exc})") from None
    except Exception as exc:  # PIL raises many types for broken files
        raise DatasetError(f"{source}: cannot decode image ({type(exc).__name__}: {exc})") from None
    if img.mode in HIGH_BIT_MODES:
        a = np.asarray(img, dtype=np.float64)
        top = 255.0 if a.size == 0 or a.max() <= 255 else (65535.0 if a.max() <= 65535 else float(a.max()))
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def resize_crop(img: Image.Image, resolution: int, center_crop: bool, random_flip: bool,
                rng: np.random.Generator) -> Image.Image:
    """Resize the shorter side to `resolution`, crop a square, maybe flip horizontally."""
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def preprocess_images(images: list[bytes], sample_ids: list[int], sources: list[str], resolution: int,
                      center_crop: bool, random_flip: bool, seed: int,
                      max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode, resize the shorter side to `resolution`, crop a square, maybe flip, scale to [-1, 1].

    Args:
        sample_ids: keys of each image's random crop/flip, drawn from `default_rng((seed, sample_id))`.
        sources: names used in errors (file paths).
    Returns:
        float32 array [B, 3, resolution, resolution].
    Raises:
        DatasetError: an image cannot be decoded; the message names its source.
    """
    out = np.empty((len(images), 3, resolution, resolution), dtype=np.float32)
    for i, (data, sid, src) in enumerate(zip(images, sample_ids, sources)):
        rng = np.random.default_rng((seed, int(sid)))
        img = resize_crop(decode_image(data, src, max_pixels), resolution, center_crop, random_flip, rng)
        out[i] = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return out


def tokenize_captions(tokenizer, captions: list[str]) -> np.ndarray:
    """Token ids int64 [B, model_max_length], padded and truncated."""
    ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="np").input_ids
    return ids.astype(np.int64)
