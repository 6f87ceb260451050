"""Evaluation suites: fixed lists of (prompt, generator seed[, control image]) that `diffray eval` renders,
and the held-out control images (Canny maps of world scenes) shared with `builtin:world/canny`.

Eval scenes come from seed EVAL_SEED + the suite seed, never from the seed-0 training sets. Never imports
torch or ray.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from diffray.errors import ConfigError
from diffray.world.grammar import CLASS_PROMPT, INSTANCE_PROMPT, RESERVED, Scene
from diffray.world.render import png_bytes, render
from diffray.world.scenes import scene_at
from diffray.world.scores import outline_coverage

SUITES = {
    "prompts": "prompts of the pretraining grammar (held-out triples at their natural share)",
    "heldout": "the held-out colour/shape/background triples",
    "controlnet": "held-out Canny maps of world scenes, with their captions",
    "subject": "'a photo of sks widget' (fidelity) and 'a photo of a widget' (class drift)",
    "star": "prompts with the reserved shape", "cyan": "prompts with the reserved colour",
    "striped": "prompts with the reserved texture",
    "triangle": "prompts with a triangle, a shape the model knows (a Textual Inversion token in place of the word)",
}
SUITE_SPLIT = {"prompts": "base", "heldout": "heldout", "controlnet": "pretrain", "star": "star", "cyan": "cyan",
               "striped": "striped", "triangle": "triangle"}
CONCEPT_SUITES = ("star", "cyan", "striped", "subject", "triangle")
# concept suite -> the words a Textual Inversion token replaces: the reserved concepts', and the control's
CONCEPT_WORDS = {**RESERVED, "triangle": "triangle"}
DEFAULT_NUM = 64
EVAL_SEED = 1000
SEED_STRIDE = 100_000  # generator seeds of suite seed s: s * SEED_STRIDE + item id
MIN_OUTLINE = 0.8  # a control map must trace this share of the shape's outline to say anything


@dataclass(frozen=True)
class EvalItem:
    """One image to render. `prompt` is scored and rendered by the base model; `adapter_prompt` is what the
    adapted model renders (the prompt with a Textual Inversion token in place of the concept's words)."""

    id: int
    prompt: str
    adapter_prompt: str
    seed: int
    control: bytes = b""  # PNG of the control image (controlnet suite)


def canny_controls(seed: int, split: str,
                   resolution: int = 64) -> Iterator[tuple[int, Scene, Image.Image, Image.Image]]:
    """(index, scene, image, control) for the scenes of `split` whose Canny map (the `canny` preprocessor's
    defaults) traces their outline: Canny on gray sees no edge between colours of equal brightness."""
    from diffray.data.conditioning import make_preprocessor

    canny = make_preprocessor("canny")
    index = 0
    while True:
        scene = scene_at(seed, split, index)
        image = render(scene, resolution)
        control = canny(image)
        if outline_coverage(control, image) >= MIN_OUTLINE:
            yield index, scene, image, control
        index += 1


def write_canny_pairs(root: Path, num: int, seed: int = 0, resolution: int = 64) -> Path:
    """A ControlNet training set in `root`: images/, conditioning/, metadata.jsonl {file_name, text,
    conditioning_image} (the layout of `diffray data condition`), from `pretrain` scenes with visible maps."""

    (root / "images").mkdir(parents=True)
    (root / "conditioning").mkdir()
    lines = []
    for k, (index, scene, image, control) in zip(range(num), canny_controls(seed, "pretrain", resolution)):
        name = f"{index:08d}.png"
        (root / "images" / name).write_bytes(png_bytes(image))
        (root / "conditioning" / name).write_bytes(png_bytes(control))
        lines.append(json.dumps({"file_name": f"images/{name}", "text": scene.caption,
                                 "conditioning_image": f"conditioning/{name}"}) + "\n")
    (root / "metadata.jsonl").write_text("".join(lines))
    return root


def with_token(prompt: str, suite: str, token: str | None) -> str:
    """`prompt` with the concept's words of `suite` replaced by `token` (unchanged without a token)."""
    if not token or suite not in CONCEPT_SUITES:
        return prompt
    words = CONCEPT_WORDS[suite]
    return re.sub(rf"\b{re.escape(words)}\b", token, prompt)


def check_suite(suite: str, num: int | None, token: str | None) -> int:
    """The number of items; ConfigError for an unknown suite, a bad count or a token where no concept is."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r} (allowed: {', '.join(SUITES)})", field="suite")
    num = DEFAULT_NUM if num is None else num
    if not 1 <= num <= SEED_STRIDE:  # more would reuse the generator seeds of the next suite seed
        raise ConfigError(f"must be in [1, {SEED_STRIDE}], got {num}", field="num")
    if token is not None and (suite not in CONCEPT_SUITES or not token.strip() or " " in token.strip()):
        raise ConfigError(f"{token!r}: a token replaces the concept of a concept suite ({', '.join(CONCEPT_SUITES)}) "
                          "and is one word, e.g. '<star>'", field="token")
    return num


def build_suite(suite: str, num: int | None = None, seed: int = 0, resolution: int = 64,
                token: str | None = None) -> list[EvalItem]:
    """The suite's items, the same for the same (suite, num, seed, resolution, token).

    Raises:
        ConfigError: unknown suite, num outside [1, SEED_STRIDE], or a token for a suite without a concept.
    """
    num = check_suite(suite, num, token)
    seeds = [seed * SEED_STRIDE + i for i in range(num)]
    if suite == "subject":
        prompts = [INSTANCE_PROMPT] * ((num + 1) // 2) + [CLASS_PROMPT] * (num // 2)
        return [EvalItem(i, p, with_token(p, suite, token) if p == INSTANCE_PROMPT else p, seeds[i])
                for i, p in enumerate(prompts)]
    if suite == "controlnet":
        controls = zip(range(num), canny_controls(EVAL_SEED + seed, SUITE_SPLIT[suite], resolution))
        return [EvalItem(i, scene.caption, scene.caption, seeds[i], png_bytes(control))
                for i, (_, scene, _, control) in controls]
    scenes = [scene_at(EVAL_SEED + seed, SUITE_SPLIT[suite], i) for i in range(num)]
    return [EvalItem(i, s.caption, with_token(s.caption, suite, token), seeds[i]) for i, s in enumerate(scenes)]
