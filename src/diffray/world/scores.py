"""Scores of generated images against the world: prompt fields right or wrong, accuracy tables, ControlNet
agreement (edge F1, shape IoU), subject fidelity and JPEG size.

Plain functions on PIL images / arrays, shared by tests, `diffray eval`, rewards and benchmarks. Never
imports torch or ray.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from diffray.world.grammar import POSITION_READ, SIZE_SPLIT, parse_prompt
from diffray.world.reader import (MAX_AREA, MIN_AREA, Reading, as_rgb, border_colour, largest_region, palette_lab,
                                  read_scene, smooth, to_lab)

FIELDS = ("bg", "colour", "shape", "texture", "size", "position", "subject")
CANNY_THRESHOLDS = (100, 200)  # the `canny` conditioning preprocessor's defaults
EDGE_TOLERANCE = 2.0  # pixels: an edge this close to a control edge agrees with it
SUBJECT_RIGHT = 0.5  # fidelity at which "a photo of sks widget" counts as right


def _position_ok(reading: Reading, position: str) -> bool:
    if reading.cx is None:
        return False
    cx, cy = reading.cx, reading.cy
    return {"on the left": cx < POSITION_READ, "on the right": cx > 1 - POSITION_READ,
            "at the top": cy < POSITION_READ, "at the bottom": cy > 1 - POSITION_READ}[position]


def field_checks(reading: Reading, stated: dict[str, str], image=None) -> dict[str, bool]:
    """Right/wrong for each field `stated` (from `parse_prompt`) given what the reader saw."""
    out = {}
    for name, want in stated.items():
        if name in ("bg", "colour", "shape"):
            out[name] = getattr(reading, name) == want
        elif name == "texture":
            out[name] = bool(reading.striped)
        elif name == "size":
            out[name] = reading.r is not None and (reading.r < SIZE_SPLIT) == (want == "small")
        elif name == "position":
            out[name] = _position_ok(reading, want)
        elif name == "subject":
            out[name] = image is not None and subject_fidelity(image) >= SUBJECT_RIGHT
    return out  # the class prompt ("a photo of a widget") states nothing the reader checks


def score(image, prompt: str, reading: Reading | None = None) -> dict[str, bool]:
    """{field: right?} for the fields `prompt` states (unstated fields are not scored).

    Raises:
        ConfigError: the prompt is not in the world grammar.
    """
    stated = parse_prompt(prompt)
    return field_checks(reading if reading is not None else read_scene(image), stated, image)


def alignment(image, prompt: str) -> float:
    """Share of the prompt's fields the image gets right (1.0 when it states none): a reward in [0, 1]."""
    checks = score(image, prompt)
    return float(np.mean(list(checks.values()))) if checks else 1.0


def accuracy_table(rows: list[dict[str, bool]]) -> dict[str, dict]:
    """Per field {right, total, accuracy} over scored rows, plus "all" (every stated field right)."""
    table = {}
    for name in FIELDS + ("all",):
        hits = [all(r.values()) if name == "all" else r[name] for r in rows if (r if name == "all" else name in r)]
        if hits:
            table[name] = {"right": int(sum(hits)), "total": len(hits), "accuracy": float(np.mean(hits))}
    return table


def jpeg_kb(image, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of the image as a PIL JPEG at `quality` (DDPO's compressibility measure)."""
    buf = io.BytesIO()
    Image.fromarray(as_rgb(image)).save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


# ------------------------------------------------------------------------------------------- ControlNet

def edge_map(image) -> np.ndarray:
    """Bool edges of an image, as the `canny` preprocessor draws them."""
    return cv2.Canny(cv2.cvtColor(as_rgb(image), cv2.COLOR_RGB2GRAY), *CANNY_THRESHOLDS) > 0


def _control_edges(control) -> np.ndarray:
    return cv2.cvtColor(as_rgb(control), cv2.COLOR_RGB2GRAY) > 127


def _near(edges: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the nearest edge pixel."""
    return cv2.distanceTransform((~edges).astype(np.uint8), cv2.DIST_L2, 3)


def edge_f1(control, image, tolerance: float = EDGE_TOLERANCE) -> float:
    """F1 of the image's Canny edges against a control edge map, an edge counting as matched within
    `tolerance` pixels of the other map's edges (1.0 when both are empty)."""
    want, got = _control_edges(control), edge_map(image)
    if not want.any() and not got.any():
        return 1.0
    if not want.any() or not got.any():
        return 0.0
    precision = float(np.mean(_near(want)[got] <= tolerance))
    recall = float(np.mean(_near(got)[want] <= tolerance))
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def outline_coverage(control, image) -> float:
    """Share of the outline of the shape the reader finds in `image` that lies within EDGE_TOLERANCE of an
    edge of `control`. Canny on gray misses edges between colours of similar brightness (a green circle on
    red): such a control map says nothing, and suites skip it."""
    mask = read_scene(image).mask
    if mask is None:
        return 0.0
    outline = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    return float(np.mean(_near(_control_edges(control))[outline] <= EDGE_TOLERANCE))


def control_mask(control) -> np.ndarray:
    """The shape a control edge map outlines: everything the edges enclose (gaps of a pixel bridged)."""
    edges = _control_edges(control).astype(np.uint8)
    closed = cv2.dilate(edges, np.ones((3, 3), np.uint8))
    outside = np.zeros((closed.shape[0] + 2, closed.shape[1] + 2), np.uint8)
    fill = (1 - closed).astype(np.uint8)
    cv2.floodFill(fill, outside, (0, 0), 2)  # the border ring is outside: fill from a corner
    inside = (fill != 2).astype(np.uint8)
    return cv2.erode(inside, np.ones((3, 3), np.uint8)).astype(bool)  # undo the bridging dilation


def shape_iou(control, image, reading: Reading | None = None) -> float:
    """IoU between the shape the reader finds in `image` and the shape `control` outlines (0.0 when
    either is empty)."""
    want = control_mask(control)
    got = (reading if reading is not None else read_scene(image)).mask
    if got is None or not want.any():
        return 0.0
    return float((want & got).sum() / (want | got).sum())


# ---------------------------------------------------------------------------------------- subject fidelity

@dataclass(frozen=True)
class ColourLayout:
    """Per palette colour: its share of the foreground and its centroid within the foreground's box."""

    shares: np.ndarray  # [colours + 1] (last: pixels far from every palette colour)
    centroids: np.ndarray  # [colours + 1, 2], (0.5, 0.5) where a colour is absent


def colour_layout(image) -> ColourLayout | None:
    """The foreground's colour layout, or None when no foreground stands out from the border. The
    foreground is everything 20 Lab units from the border's colour (a fixed threshold, unlike the
    reader's: a subject has parts of several colours)."""
    rgb = as_rgb(image)
    lab = to_lab(rgb)
    smooth_lab = to_lab(smooth(rgb))
    mask = largest_region(np.linalg.norm(smooth_lab - border_colour(lab), axis=2) > 20.0)
    if mask is None or not MIN_AREA <= mask.mean() <= MAX_AREA:
        return None
    _, pal = palette_lab()
    ys, xs = np.nonzero(mask)
    d = np.linalg.norm(lab[mask][:, None, :] - pal[None], axis=2)
    cls = np.where(d.min(axis=1) <= 30.0, d.argmin(axis=1), len(pal))
    box = np.array([xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()], dtype=float)
    pos = (np.stack([xs - xs.min(), ys - ys.min()], axis=1) + 0.5) / box
    shares = np.bincount(cls, minlength=len(pal) + 1) / len(cls)
    centroids = np.full((len(pal) + 1, 2), 0.5)
    for k in np.unique(cls):
        centroids[k] = pos[cls == k].mean(axis=0)
    return ColourLayout(shares, centroids)


def layout_similarity(got: ColourLayout | None, refs: list[ColourLayout]) -> float:
    """Geometric mean, over palette colours with >= 3% of the references' mean foreground, of share ratio x
    closeness of centroids (each floored at 0.01), times the share of foreground in those colours."""
    if got is None:
        return 0.0
    shares = np.mean([r.shares for r in refs], axis=0)
    centroids = np.mean([r.centroids for r in refs], axis=0)
    key = np.nonzero(shares[:-1] >= 0.03)[0]  # palette colours only: off-palette pixels are edge blends
    ratio = np.minimum(got.shares[key], shares[key]) / np.maximum(np.maximum(got.shares[key], shares[key]), 1e-9)
    near = np.exp(-np.sum((got.centroids[key] - centroids[key]) ** 2, axis=1) / (2 * 0.15 ** 2))
    terms = np.maximum(ratio * near, 0.01)
    return float(np.exp(np.mean(np.log(terms))) * got.shares[key].sum())


@lru_cache(maxsize=8)
def _default_references(resolution: int) -> tuple[list[ColourLayout], float]:
    from diffray.world.render import render
    from diffray.world.scenes import scene_at

    layouts = [colour_layout(render(scene_at(0, "subject", i), resolution)) for i in range(5)]
    return layouts, _self_score(layouts)


def _self_score(layouts: list[ColourLayout]) -> float:
    """Mean leave-one-out similarity of the references: what an exact subject scores before normalising."""
    if not layouts:
        raise ValueError("no reference image has a subject that stands out from its background")
    if len(layouts) == 1:
        return layout_similarity(layouts[0], layouts)
    return float(np.mean([layout_similarity(r, layouts[:i] + layouts[i + 1:]) for i, r in enumerate(layouts)]))


def subject_fidelity(image, references: list | None = None) -> float:
    """How much `image` looks like the subject, from the colour layout of its foreground against the
    references' (default: the world's 5 "sks widget" images at the image's size), normalised so the
    references themselves score ~1 (leave-one-out) and unrelated images near 0."""
    if references is None:
        layouts, norm = _default_references(as_rgb(image).shape[0])
    else:
        layouts = [layout for layout in map(colour_layout, references) if layout is not None]
        norm = _self_score(layouts)
    return layout_similarity(colour_layout(image), layouts) / max(norm, 1e-9)
