"""Image and caption transforms for training batches. Pure PIL/numpy (never imports ray).

Random choices (crop offset, flip) are drawn from a generator keyed by (seed, sample_id), so a sample
is transformed the same way whichever worker or batch it lands in.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

from diffray.errors import DatasetError


DEFAULT_MAX_PIXELS = 89_478_485  # PIL's decompression-bomb threshold (about 9459 x 9459)
HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def decode_image(data: bytes, source: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                 background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Decode to RGB: EXIF orientation applied, alpha composited on `background` (white for photos;
    black for control images, where transparent means "no signal"), palette/CMYK/1-bit converted,
    grayscale replicated to 3 channels, 16-bit and float grayscale scaled to 8 bits (float in [0, 1] as such).

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
    except Image.UnidentifiedImageError:  # its message names an in-memory buffer, not the file
        raise DatasetError(f"{source}: cannot decode image (no image format PIL reads; the file starts with "
                           f"{data[:8]!r})") from None
    except Exception as exc:  # PIL raises many types for broken files
        raise DatasetError(f"{source}: cannot decode image ({type(exc).__name__}: {exc})") from None
    if img.mode in HIGH_BIT_MODES:
        a = np.asarray(img, dtype=np.float64)
        top = 255.0 if a.size == 0 or a.max() <= 255 else (65535.0 if a.max() <= 65535 else float(a.max()))
        if img.mode == "F" and a.size and 0 <= a.min() and a.max() <= 1.0:  # float images in [0, 1]
            top = 1.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    return img.convert("RGB")


def aspect_buckets(resolution: int, step: int, max_aspect_ratio: float) -> list[tuple[int, int]]:
    """Bucket sizes (width, height) for aspect-ratio bucketing, sorted by aspect ratio (w / h).

    Every side is a multiple of `step`, every area at most resolution**2, the long side at most
    `max_aspect_ratio` times the short side; for each width the tallest height that fits is kept, and
    the square (resolution, resolution) is always a bucket. The list is symmetric: (w, h) and (h, w).
    """
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    w = step
    while w * step <= area:
        h = (area // w) // step * step
        if h >= step and max(w, h) <= max_aspect_ratio * min(w, h):
            sizes.update({(w, h), (h, w)})
        w += step
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height in log space (ties: the smaller ratio)."""
    import math

    target = math.log(width / height)
    return min(buckets, key=lambda s: (abs(math.log(s[0] / s[1]) - target), s[0] / s[1]))


_MIRROR = {"left": "right", "right": "left"}
_MIRROR_RE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_caption(text: str) -> str:
    """`text` as it reads for its image flipped left to right: the words "left" and "right" swapped (whole
    words, case kept: "Left" -> "Right"), so a flipped "a circle on the left" is not taught the wrong side."""

    def swap(m: re.Match) -> str:
        word = m.group(1)
        other = _MIRROR[word.lower()]
        return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other

    return _MIRROR_RE.sub(swap, text)


def resize_crop(img: Image.Image, size: int | tuple[int, int], center_crop: bool, random_flip: bool,
                rng: np.random.Generator, geometry: list | None = None, flips: list | None = None) -> Image.Image:
    """Resize to cover `size` (a square side or (width, height)), crop it, maybe flip horizontally.
    `geometry` gets (original H, original W, crop top, crop left) appended, the crop's corner in the
    image as flipped (SDXL's size/crop conditioning, as its training recipe computes it); `flips` gets
    whether it was flipped."""
    bw, bh = (size, size) if isinstance(size, int) else size
    w, h = img.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (nw - bw) // 2, (nh - bh) // 2
    else:
        left, top = int(rng.integers(0, nw - bw + 1)), int(rng.integers(0, nh - bh + 1))
    img = img.crop((left, top, left + bw, top + bh))
    flip = random_flip and rng.random() < 0.5
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if geometry is not None:
        geometry.append((h, w, top, nw - bw - left if flip else left))
    if flips is not None:
        flips.append(flip)
    return img


def preprocess_images(images: list[bytes], sample_ids: list[int], sources: list[str], resolution: int,
                      center_crop: bool, random_flip: bool, seed: int,
                      max_pixels: int = DEFAULT_MAX_PIXELS,
                      buckets: list[tuple[int, int]] | None = None,
                      background: tuple[int, int, int] = WHITE, geometry: list | None = None,
                      flips: list | None = None) -> np.ndarray:
    """Decode, resize to cover the target size, crop, maybe flip, scale to [-1, 1]. `geometry` gets each
    image's (original H, W, crop top, left), `flips` whether it was flipped: see `resize_crop`.

    The target is the square `resolution`, or with `buckets` the bucket nearest each image's aspect
    ratio (see `aspect_buckets`). Alpha is composited on `background` (see `decode_image`).

    Args:
        sample_ids: keys of each image's random crop/flip, drawn from `default_rng((seed, sample_id))`.
        sources: names used in errors (file paths).
    Returns:
        float32 array [B, 3, resolution, resolution]; with `buckets` an object array of float32
        [3, H, W] arrays (Ray Data stores it as a variable-shaped tensor column).
    Raises:
        DatasetError: an image cannot be decoded; the message names its source.
    """
    out = (np.empty((len(images), 3, resolution, resolution), dtype=np.float32) if buckets is None
           else np.empty(len(images), dtype=object))
    for i, (data, sid, src) in enumerate(zip(images, sample_ids, sources)):
        rng = np.random.default_rng((seed, int(sid)))
        img = decode_image(data, src, max_pixels, background)
        size = resolution if buckets is None else nearest_bucket(*img.size, buckets)
        img = resize_crop(img, size, center_crop, random_flip, rng, geometry, flips)
        out[i] = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    return out


def tokenize_captions(tokenizer, captions: list[str], tokenizer_2=None, concat: bool = False) -> np.ndarray:
    """Token ids int64 [B, model_max_length], padded and truncated; with `tokenizer_2` (SDXL's) [B, 2, L],
    one row per tokenizer, or with `concat` (Flux's T5, at most 512 long) [B, L1 + L2]."""
    ids = [tok(list(captions), padding="max_length", truncation=True, max_length=min(tok.model_max_length, 512),
               return_tensors="np").input_ids.astype(np.int64) for tok in (tokenizer, tokenizer_2) if tok is not None]
    if len(ids) == 1:
        return ids[0]
    return np.concatenate(ids, axis=1) if concat else np.stack(ids, axis=1)
