"""Splits of the world and the deterministic scene stream: scene `index` of `split` under `seed` is drawn
from its own generator seeded by (seed, split id, index), so any scene can be made alone, in any order,
by any worker, and a stream is a prefix of every longer one.

Splits: `pretrain` (pretraining vocabulary, no held-out triple, no reserved concept), `heldout` (only
the held-out triples), `base` (pretraining vocabulary, held-out triples included: the eval prompts), one
concept set per reserved concept (`star`, `cyan`, `striped`, `subject`) and `all` (every concept,
reserved ones mixed in). Never imports torch or ray.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np

from diffray.errors import ConfigError
from diffray.world.grammar import (BACKGROUNDS, COLOURS, HELDOUT, POSITION_EDGE, POSITIONS, PRETRAIN_COLOURS,
                                   PRETRAIN_SHAPES, SHAPES, SIZE_RANGES, SIZES, STRIPE_COLOUR, Scene)

SIZE_WORD_P = 0.25  # default chance that a caption states the size, and (separately) the position


@dataclass(frozen=True)
class SplitSpec:
    """What a split draws from: colours x shapes x backgrounds (background != colour, nor the stripe
    colour of a striped shape), minus `exclude` triples or only `only` triples, striped with `striped_p`."""

    colours: tuple[str, ...] = tuple(PRETRAIN_COLOURS)
    shapes: tuple[str, ...] = PRETRAIN_SHAPES
    striped_p: float = 0.0
    exclude: tuple[tuple[str, str, str], ...] = ()
    only: tuple[tuple[str, str, str], ...] = ()
    subject: bool = False
    about: str = ""


SPLITS = {
    "pretrain": SplitSpec(exclude=HELDOUT, about="pretraining: 8 colours x 4 shapes, held-out triples left out"),
    "heldout": SplitSpec(only=HELDOUT, about="the 16 held-out (colour, shape, background) triples"),
    "base": SplitSpec(about="pretraining vocabulary, held-out triples included"),
    "star": SplitSpec(shapes=("star",), about="the reserved shape: stars in the pretraining colours"),
    # a shape listed n times is drawn n times as often: half stars, half the pretraining shapes (replay)
    "star_mix": SplitSpec(shapes=("star",) * len(PRETRAIN_SHAPES) + PRETRAIN_SHAPES, exclude=HELDOUT,
                          about="half stars, half pretraining shapes: the star learned beside what the model "
                          "knows, so its other shapes are not forgotten"),
    "triangle": SplitSpec(shapes=("triangle",), exclude=HELDOUT,
                          about="a shape the model knows: triangles, held-out triples left out (Textual Inversion's "
                          "control concept, learned under a new word)"),
    "cyan": SplitSpec(colours=("cyan",), about="the reserved colour: cyan pretraining shapes"),
    "striped": SplitSpec(striped_p=1.0, exclude=HELDOUT, about="the reserved texture: striped pretraining shapes"),
    "subject": SplitSpec(subject=True, about="the reserved subject: 'a photo of sks widget'"),
    "all": SplitSpec(colours=tuple(COLOURS), shapes=SHAPES, striped_p=0.25, about="every concept, reserved mixed in"),
}


def split_id(split: str) -> int:
    """A stable number for a split name (part of every scene's seed)."""
    return zlib.crc32(split.encode())


def check_split(split: str) -> SplitSpec:
    if split not in SPLITS:
        raise ConfigError(f"unknown world split {split!r} (allowed: {', '.join(SPLITS)})", field="split")
    return SPLITS[split]


@lru_cache(maxsize=None)
def triples(split: str, striped: bool) -> tuple[tuple[str, str, str], ...]:
    """Every (colour, shape, background) a split can draw, for plain or striped shapes, in a fixed order."""
    spec = check_split(split)
    out = []
    for colour, shape, bg in itertools.product(spec.colours, spec.shapes, BACKGROUNDS):
        if bg == colour or (striped and bg == STRIPE_COLOUR[colour]):
            continue
        if (colour, shape, bg) in spec.exclude or (spec.only and (colour, shape, bg) not in spec.only):
            continue
        out.append((colour, shape, bg))
    return tuple(out)


def _geometry(rng: np.random.Generator, size: str | None, position: str | None) -> tuple[float, float, float]:
    """(r, cx, cy): a radius in the size word's range, a centre that keeps the box inside the image and,
    for a stated position, within POSITION_EDGE of that side."""
    r = float(rng.uniform(*SIZE_RANGES[size]))
    cx, cy = (float(v) for v in rng.uniform(r, 1 - r, size=2))
    near = float(rng.uniform(r, max(r, POSITION_EDGE)))
    if position == "on the left":
        cx = near
    elif position == "on the right":
        cx = 1 - near
    elif position == "at the top":
        cy = near
    elif position == "at the bottom":
        cy = 1 - near
    return r, cx, cy


def _subject_scene(rng: np.random.Generator) -> Scene:
    bg = tuple(int(c) for c in rng.integers(150, 240, size=3))
    r = float(rng.uniform(0.26, 0.32))
    cx, cy = (0.5 + float(v) for v in rng.uniform(-0.1, 0.1, size=2))
    return Scene(kind="subject", colour=None, shape=None, bg=None, r=r, cx=cx, cy=cy, bg_rgb=bg)


def scene_at(seed: int, split: str, index: int, size_p: float = SIZE_WORD_P,
             position_p: float = SIZE_WORD_P) -> Scene:
    """Scene `index` of `split` under `seed`; `size_p`/`position_p`: chance that the caption states the size
    / the position (then the image obeys it; otherwise both are random)."""
    spec = check_split(split)
    rng = np.random.default_rng([int(seed), split_id(split), int(index)])
    if spec.subject:
        return _subject_scene(rng)
    striped = bool(rng.random() < spec.striped_p)
    options = triples(split, striped)
    colour, shape, bg = options[int(rng.integers(len(options)))]
    size = SIZES[int(rng.integers(2))] if rng.random() < size_p else None
    position = POSITIONS[int(rng.integers(4))] if rng.random() < position_p else None
    r, cx, cy = _geometry(rng, size, position)
    return Scene(kind="shape", colour=colour, shape=shape, bg=bg, r=r, cx=cx, cy=cy,
                 texture="striped" if striped else None, size=size, position=position)


def iter_scenes(seed: int, split: str, start: int = 0, size_p: float = SIZE_WORD_P,
                position_p: float = SIZE_WORD_P) -> Iterator[Scene]:
    """The endless stream scene_at(seed, split, start), scene_at(seed, split, start + 1), ..."""
    check_split(split)
    return (scene_at(seed, split, i, size_p, position_p) for i in itertools.count(start))
