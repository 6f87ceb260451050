"""Training prompts: for Textual Inversion the "object" and "style" template lists of the original code
(imagenet_templates_small / imagenet_style_templates_small) and a seeded per-sample pick; for DDPO a
prompt list or prompts file.

The template a sample gets is keyed by (seed, step, sample_id), like its noise, so it does not depend on
the worker layout or on a resume. Pure Python + torch: never imports ray.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffray.errors import ConfigError
from diffray.trainers.components.diffusion import sample_generator

OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
TEMPLATE_SEED_OFFSET = 104_729  # keeps the template draw independent of the noise drawn for the same key


def template_prompts(learnable_property: str, placeholder: str, sample_ids: list[int], step: int,
                     seed: int) -> list[str]:
    """One prompt per sample: a template of `learnable_property` ("object" | "style") with `{}` replaced
    by `placeholder` (for multi-vector tokens, all of them: `<tok> <tok>_1 ...`)."""
    templates = TEMPLATES[learnable_property]
    picks = [int(torch.randint(len(templates), (1,), generator=sample_generator(seed + TEMPLATE_SEED_OFFSET, step,
                                                                              int(sid))))
             for sid in sample_ids]
    return [templates[i].format(placeholder) for i in picks]


def read_prompts(prompts: list[str], prompts_file: str | None, field: str) -> list[str]:
    """`prompts_file`'s non-blank lines when set, else `prompts`. Raises ConfigError naming `field` for a
    missing or empty file."""
    if prompts_file is None:
        return list(prompts)
    path = Path(prompts_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts file not found: {path}", field=field)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{path} holds no prompts", field=field)
    return lines
