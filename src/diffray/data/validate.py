"""Row validation for training data: what makes a row unusable, as one short reason. Pure Python +
PIL (never imports ray); the Ray Data pass that applies it and the quarantine report live in
`diffray.data.pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffray.data.transforms import DEFAULT_MAX_PIXELS, decode_image
from diffray.errors import DatasetError


@dataclass(frozen=True)
class Rules:
    """What a usable row needs (from the `data` config section)."""

    min_image_size: int = 32
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    default_caption: str | None = None
    conditioning: bool = False  # rows need a conditioning image of the image's size

    @classmethod
    def of(cls, data) -> Rules:
        return cls(data.min_image_size, data.max_image_pixels, data.default_caption,
                   data.conditioning_column is not None)


def caption_of(caption, rules: Rules) -> str | None:
    """The caption a row trains with: its own when non-empty, else the configured default, else None."""
    text = str(caption).strip() if isinstance(caption, str) else ""
    return text or rules.default_caption


def as_bytes(value) -> bytes | None:
    """A cell of an image column as bytes, or None when absent (Ray Data turns an all-None object
    column into NaN floats, so anything that is not bytes counts as absent)."""
    return bytes(value) if isinstance(value, (bytes, bytearray, memoryview)) else None


def check_row(batch: dict, i: int, rules: Rules) -> str | None:
    """`check_sample` for row `i` of a raw batch; a reader's own verdict (`error`: a file outside the
    folder, a wrong JSON type) comes first, since such a row was never read."""
    error = batch["error"][i] if "error" in batch else ""
    if error:
        return str(error)
    conds = batch.get("conditioning_image")
    reason = check_sample(batch["image"][i], batch["caption"][i], None if conds is None else conds[i],
                          str(batch["source"][i]), rules)
    if reason is None and "mask_image" in batch:  # the reader adds the column only with data.mask_column
        reason = check_mask(batch["mask_image"][i], batch["image"][i], str(batch["source"][i]), rules)
    if reason is None and "pair_image" in batch:  # a preference pair's other image: any size, it is cropped
        why = check_sample(batch["pair_image"][i], batch["caption"][i], None, str(batch["source"][i]), rules)
        reason = None if why is None else f"pair image: {why}"
    return reason


def check_mask(mask: bytes | None, image: bytes, source: str, rules: Rules) -> str | None:
    """None when a row's loss mask decodes at its image's size, else why not (the image is known good)."""
    size = decode_image(as_bytes(image), source, rules.max_image_pixels).size
    return companion_problem("mask", as_bytes(mask), size, source, rules)


def companion_problem(what: str, data: bytes | None, size: tuple[int, int], source: str, rules: Rules) -> str | None:
    """None when a row's companion image (its conditioning image or loss mask) decodes at the image's
    size, else why not, named by `what`."""
    if data is None:
        return f"{what} image not found"
    try:
        other = decode_image(data, source, rules.max_image_pixels)
    except DatasetError as exc:
        return f"{what} image: " + str(exc).removeprefix(f"{source}: ")
    if other.size != size:
        return f"{what} image is {other.size[0]}x{other.size[1]}, the image {size[0]}x{size[1]}"
    return None


def check_sample(image: bytes | None, caption, conditioning: bytes | None, source: str, rules: Rules) -> str | None:
    """None when the row is usable, else why not (one line, no file name: the report has the source)."""
    image, conditioning = as_bytes(image), as_bytes(conditioning)
    if image is None:
        return "image file not found"
    try:
        img = decode_image(image, source, rules.max_image_pixels)
    except DatasetError as exc:
        return str(exc).removeprefix(f"{source}: ")
    w, h = img.size
    if min(w, h) < rules.min_image_size:
        return f"too small: {w}x{h}, shorter side below data.min_image_size={rules.min_image_size}"
    if caption_of(caption, rules) is None:
        return "empty caption (set data.default_caption to train such rows)"
    if rules.conditioning:
        return companion_problem("conditioning", conditioning, img.size, source, rules)
    return None
