"""The facts of the shapes world: palette, shapes, reserved concepts, the caption grammar and its parser.

One caption form: `a {size }{colour} {texture }{shape}{ position} on a {bg} background`, plus the subject
prompts ("a photo of sks widget", "a photo of a widget"). Everything here is data and string handling:
the tokenizer of the world model is built from `WORDS`, so these names never change silently (tests pin
them). Never imports torch, ray or image libraries.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from diffray.errors import ConfigError

# Pretraining palette: the RGB of the first sample set, kept so old captions still describe their pixels.
PRETRAIN_COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 210, 40),
                    "white": (245, 245, 245), "black": (20, 20, 20), "purple": (140, 50, 170),
                    "orange": (240, 140, 30)}
# Reserved colour: >= 47 Lab units from every pretraining colour (the closest pretraining pair, blue and
# purple, is 32 apart), so the reader never confuses it.
RESERVED_COLOURS = {"cyan": (0, 190, 200)}
COLOURS = {**PRETRAIN_COLOURS, **RESERVED_COLOURS}
BACKGROUNDS = tuple(PRETRAIN_COLOURS)  # backgrounds are always pretraining colours
PRETRAIN_SHAPES = ("circle", "square", "triangle", "diamond")
RESERVED_SHAPES = ("star",)
SHAPES = PRETRAIN_SHAPES + RESERVED_SHAPES
TEXTURES = ("striped",)  # reserved; no texture word means a plain fill
# A striped shape is filled with diagonal bands of its colour (60%) and a contrasting stripe colour (40%):
# white on dark colours (Lab L* < 55), black on light ones. Its background is neither colour.
STRIPE_COLOUR = {"red": "white", "blue": "white", "purple": "white", "black": "white", "green": "black",
                 "yellow": "black", "white": "black", "orange": "black", "cyan": "black"}
STRIPE_PERIOD = 1 / 8  # band period across the stripes, as a fraction of the image side
STRIPE_FILL = 0.6  # share of each period in the shape's own colour
SIZES = ("small", "large")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")
SUBJECT = "sks widget"
INSTANCE_PROMPT = "a photo of sks widget"
CLASS_PROMPT = "a photo of a widget"
RESERVED = {"star": "star", "cyan": "cyan", "striped": "striped", "subject": SUBJECT}  # concept -> its words

# Radius (half the side of the shape's bounding box) as a fraction of the image side, per size word.
SIZE_RANGES = {"small": (0.14, 0.20), "large": (0.30, 0.36), None: (0.18, 0.32)}
SIZE_SPLIT = 0.25  # the reader calls a radius below this small, at or above it large
POSITION_EDGE = 0.40  # a stated position puts the centre within [r, 0.40] of that side (as a fraction)
POSITION_READ = 0.45  # the reader accepts a stated position when the centre is within 0.45 of that side

# Held-out (colour, shape, background) triples: never in pretraining, they test composition. Built by
# the rule colour i % 8, shape (i + i // 8) % 4, background colour + 1 (i < 8) or + 3 (i >= 8), so each
# colour is held out twice, each shape four times, each background twice; all still appear elsewhere.
HELDOUT = (
    ("red", "circle", "green"), ("green", "square", "blue"), ("blue", "triangle", "yellow"),
    ("yellow", "diamond", "white"), ("white", "circle", "black"), ("black", "square", "purple"),
    ("purple", "triangle", "orange"), ("orange", "diamond", "red"), ("red", "square", "yellow"),
    ("green", "triangle", "white"), ("blue", "diamond", "black"), ("yellow", "circle", "purple"),
    ("white", "square", "orange"), ("black", "triangle", "red"), ("purple", "diamond", "green"),
    ("orange", "circle", "blue"),
)

# Words of the prompts the methods use besides the grammar: Textual Inversion's object/style templates
# (trainers/components/prompts.py; a test keeps the two in step), the subject prompts, shipped configs.
_PROMPT_WORDS = (
    "photo", "of", "the", "in", "style", "painting", "rendering", "rendition", "picture", "cropped", "clean",
    "dirty", "dark", "bright", "my", "cool", "close-up", "good", "one", "nice", "weird", "sks", "widget", "an",
    "and", "with", "table", "image", "drawing",
)
_GRAMMAR_WORDS = ("a", "on", "background", "left", "right", "at", "top", "bottom")
WORDS: tuple[str, ...] = tuple(dict.fromkeys(
    _GRAMMAR_WORDS + SIZES + tuple(COLOURS) + TEXTURES + SHAPES + _PROMPT_WORDS))


@dataclass(frozen=True)
class Scene:
    """One world image's content. Geometry is in fractions of the image side: the shape's bounding box
    is centred on (cx, cy) with half-side r. `size`/`position` are the words the caption states (None:
    unstated, the value was drawn at random). A subject scene has kind "subject", `bg_rgb` its light
    background and no colour/shape words."""

    kind: str  # "shape" | "subject"
    colour: str | None
    shape: str | None
    bg: str | None
    r: float
    cx: float
    cy: float
    texture: str | None = None
    size: str | None = None
    position: str | None = None
    bg_rgb: tuple[int, int, int] | None = field(default=None)

    @property
    def caption(self) -> str:
        if self.kind == "subject":
            return INSTANCE_PROMPT
        return caption(self.colour, self.shape, self.bg, self.size, self.texture, self.position)

    def fields(self) -> dict:
        """Column values for dataset writers (tuples become lists)."""
        d = asdict(self)
        d["bg_rgb"] = list(self.bg_rgb) if self.bg_rgb else None
        return d


def caption(colour: str, shape: str, bg: str, size: str | None = None, texture: str | None = None,
            position: str | None = None) -> str:
    """The one caption form: `a {size }{colour} {texture }{shape}{ position} on a {bg} background`."""
    words = ["a", size, colour, texture, shape, position, "on a", bg, "background"]
    return " ".join(w for w in words if w)


def _alt(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PROMPT_RE = re.compile(
    rf"^an? (?:(?P<size>{_alt(SIZES)}) )?(?:(?P<colour>{_alt(COLOURS)}) )?(?:(?P<texture>{_alt(TEXTURES)}) )?"
    rf"(?P<shape>{_alt(SHAPES)})(?: (?P<position>{_alt(POSITIONS)}))?"
    rf"(?: on an? (?P<bg>{_alt(COLOURS)}) background)?$")


def parse_prompt(prompt: str) -> dict[str, str]:
    """The fields a world prompt states: some of colour, shape, bg, size, texture, position; or
    {"subject": "sks widget"} / {"class": "widget"} for the subject prompts. Case and extra spaces are
    ignored; clauses may be left out ("a yellow triangle").

    Raises:
        ConfigError: the prompt is not in the grammar (field "prompt").
    """
    text = " ".join(prompt.lower().split())
    if text == INSTANCE_PROMPT:
        return {"subject": SUBJECT}
    if text == CLASS_PROMPT:
        return {"class": "widget"}
    m = _PROMPT_RE.match(text)
    if not m:
        raise ConfigError(f"{prompt!r} is not a world prompt (form: 'a [small|large] <colour> [striped] <shape> "
                          "[on the left|...] on a <colour> background')", field="prompt")
    return {k: v for k, v in m.groupdict().items() if v is not None}
