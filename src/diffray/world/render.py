"""Draw a `Scene` as an anti-aliased RGB image of any size: shapes (incl. the reserved star and stripes)
and the "sks widget" subject.

Drawing happens at `SUPERSAMPLE` x the target size and is box-averaged down, so edges are anti-aliased
and the same scene gives the same pixels at every call (no randomness here: scenes carry it). Never
imports torch or ray.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from diffray.world.grammar import COLOURS, STRIPE_COLOUR, STRIPE_FILL, STRIPE_PERIOD, Scene

SUPERSAMPLE = 4
STAR_INNER = 0.5  # inner/outer radius of the 5-pointed star (fatter than a pentagram: readable at 64 px)
_STAR_HALF_WIDTH = math.sin(math.radians(72))  # outer radius -> half the star's bounding-box width
WIDGET_PARTS = {"body": "orange", "stripes": "black", "cap": "green"}


def star_points(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """The 10 vertices of an upright 5-pointed star whose bounding box is 2r wide and centred on (cx, cy)."""
    outer = r / _STAR_HALF_WIDTH
    top, bottom = -outer, outer * math.cos(math.radians(36))
    dy = -(top + bottom) / 2  # moves the bounding box's centre onto cy
    pts = []
    for k in range(10):
        rad = outer if k % 2 == 0 else outer * STAR_INNER
        a = math.radians(-90 + 36 * k)
        pts.append((cx + rad * math.cos(a), cy + dy + rad * math.sin(a)))
    return pts


def shape_outline(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Fill `shape` with its bounding box [cx - r, cx + r] x [cy - r, cy + r] (pixel units)."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "star":
        draw.polygon(star_points(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


@lru_cache(maxsize=8)
def stripe_mask(size: int) -> Image.Image:
    """Mode "L" [size, size]: 255 on the stripe bands (diagonal, rising to the right) of a `size` canvas."""
    period = STRIPE_PERIOD * size * math.sqrt(2)  # along x + y, so the period across the bands is STRIPE_PERIOD
    u = np.add.outer(np.arange(size), np.arange(size)) + 0.5
    return Image.fromarray(((u % period) >= STRIPE_FILL * period).astype(np.uint8) * 255, mode="L")


def _shape_canvas(scene: Scene, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), COLOURS[scene.bg])
    args = (scene.shape, scene.cx * size, scene.cy * size, scene.r * size)
    if scene.texture != "striped":
        shape_outline(ImageDraw.Draw(img), *args, COLOURS[scene.colour])
        return img
    mask = Image.new("L", (size, size), 0)
    shape_outline(ImageDraw.Draw(mask), *args, 255)
    fill = Image.new("RGB", (size, size), COLOURS[scene.colour])
    fill.paste(COLOURS[STRIPE_COLOUR[scene.colour]], mask=stripe_mask(size))
    img.paste(fill, mask=mask)
    return img


def _widget_canvas(scene: Scene, size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(scene.bg_rgb or (200, 200, 200)))
    d = ImageDraw.Draw(img)
    r, cx, cy = scene.r * size, scene.cx * size, scene.cy * size
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[WIDGET_PARTS["body"]])
    width = max(1, round(size / 32))
    for k in (-1, 0, 1):
        y = cy + k * r / 2.5
        d.line([cx - r * 0.8, y, cx + r * 0.8, y], fill=COLOURS[WIDGET_PARTS["stripes"]], width=width)
    d.rectangle([cx - r / 4, cy - r * 1.35, cx + r / 4, cy - r * 0.9], fill=COLOURS[WIDGET_PARTS["cap"]])
    return img


def render(scene: Scene, resolution: int = 64) -> Image.Image:
    """The scene as a `resolution` x `resolution` RGB image (drawn at 4x, box-averaged down)."""
    if resolution < 8:
        raise ValueError(f"resolution {resolution} is below the minimum of 8")
    size = resolution * SUPERSAMPLE
    hi = _widget_canvas(scene, size) if scene.kind == "subject" else _shape_canvas(scene, size)
    return hi.resize((resolution, resolution), Image.Resampling.BOX)  # box = the mean of each 4x4 block
