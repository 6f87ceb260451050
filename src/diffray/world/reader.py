"""Read a world image back with classical vision (OpenCV + numpy, no learned model): background colour,
the shape's colour, kind, texture, position and size, and its mask.

Method: the background is a smooth Lab surface fitted to the image border (then to everything outside a
first rough shape); the shape is the largest connected region farther from it than half the distance
between background and foreground colours (holes filled); the background's colour is the median outside it;
colours are the nearest palette colour in CIE Lab; the kind is the nearest prototype in a small feature
space (box fill, hull fill, centroid height, 3/4/5-fold symmetry of the outline) whose prototypes are the
renderer's own shapes, crisp and softened as a decoder softens them; stripes are a diagonal wave at the
world's stripe period fitted to the interior.
Tolerates blur, off colours, uneven shading, ragged edges and specks. Never imports torch or ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from diffray.world.grammar import COLOURS, SHAPES, SIZE_SPLIT, STRIPE_COLOUR, STRIPE_PERIOD

MIN_AREA = 0.004  # a region below this share of the image is no shape (a speck)
MAX_AREA = 0.75  # ...and above it is no shape either (the largest shape fills ~52%): noise, a colour wash
STRIPE_AMPLITUDE = 6.0  # Lab units: the weakest stripe wave that counts (sharp stripes give 30-55)
STRIPE_EXPLAINED = 0.5  # ...and the least share of the interior's colour variance it must explain
CENTRE_BAND = 0.05  # centres this close to the middle have no named region
PROTOTYPE_BLURS = (1.0, 2.0)  # Gaussian sigmas (px at 64) of the softened prototype rows of each shape
FEATURE_SCALE = np.array([0.1, 0.1, 0.05, 0.08, 0.05, 0.08])  # typical spread of each `shape_features` entry


@dataclass
class Reading:
    """What the reader sees. Geometry in fractions of the image side; None where no shape was found."""

    bg: str | None
    colour: str | None = None
    shape: str | None = None
    striped: bool | None = None
    cx: float | None = None
    cy: float | None = None
    r: float | None = None
    region: str | None = None
    size: str | None = None
    mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def found(self) -> bool:
        return self.mask is not None

    def fields(self) -> dict:
        """The reading without its mask (JSON-ready)."""
        return {k: v for k, v in self.__dict__.items() if k != "mask"}


@lru_cache(maxsize=1)
def palette_lab() -> tuple[tuple[str, ...], np.ndarray]:
    names = tuple(COLOURS)
    return names, to_lab(np.asarray([[COLOURS[n] for n in names]], dtype=np.uint8))[0]


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., H, W, 3] -> float32 CIE Lab (L in 0..100)."""
    return cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def nearest_colour(lab: np.ndarray) -> str:
    """The palette colour (pretraining + reserved) nearest to one Lab colour."""
    names, pal = palette_lab()
    return names[int(np.argmin(np.linalg.norm(pal - lab, axis=1)))]


def as_rgb(image) -> np.ndarray:
    """uint8 RGB [H, W, 3] from a PIL image or an array (grayscale and alpha are converted)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3]).astype(np.uint8)


def smooth(rgb: np.ndarray) -> np.ndarray:
    """3x3 median filter: removes pixel noise and specks before segmentation, keeps edges."""
    return cv2.medianBlur(rgb, 3)


def border_ring(shape: tuple[int, ...]) -> np.ndarray:
    """Bool mask of a border ring 1/32 of the side wide."""
    ring = np.zeros(shape[:2], dtype=bool)
    w = max(1, round(shape[0] / 32))
    ring[:w], ring[-w:], ring[:, :w], ring[:, -w:] = True, True, True, True
    return ring


def border_colour(lab: np.ndarray) -> np.ndarray:
    """Median Lab colour of the border ring."""
    return np.median(lab[border_ring(lab.shape)], axis=0)


def least_squares(design: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Least-squares coefficients through the normal equations, summed with einsum: tiny systems, and
    `np.linalg.lstsq` would hand each to a multi-threaded BLAS (5x slower on a busy machine)."""
    gram = np.einsum("ni,nj->ij", design, design) + 1e-9 * np.eye(design.shape[1])
    return np.linalg.solve(gram, np.einsum("ni,n...->i...", design, values))


def background_field(lab: np.ndarray, known: np.ndarray, order: int) -> np.ndarray:
    """The background as a smooth Lab surface (plane for order 1, quadratic for 2) fitted to the `known`
    background pixels, refitted once without the worst quarter (shape pixels touching the border, specks)."""
    h, w = known.shape
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = (xx / (w - 1)) * 2 - 1, (yy / (h - 1)) * 2 - 1
    terms = [np.ones_like(x), x, y] + ([x * x, x * y, y * y] if order == 2 else [])
    design = np.stack(terms, axis=-1)
    rows, values = design[known], lab[known]
    coef = least_squares(rows, values)
    resid = np.linalg.norm(values - rows @ coef, axis=1)
    keep = resid <= np.quantile(resid, 0.75)
    coef = least_squares(rows[keep], values[keep])
    return design @ coef


def largest_region(binary: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected region of a bool mask with its holes filled, or None when empty."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=8)
    if n <= 1:
        return None
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = (labels == biggest).astype(np.uint8)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros_like(region)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.astype(bool)


def segment(lab: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(the shape's mask or None, the background pixels' median Lab colour).

    The background is a smooth surface fitted to the border ring (then, quadratic, to everything outside
    a first rough shape), so shading does not join the shape; the shape is the largest region farther from
    it than half the background-foreground distance, holes filled."""
    field = background_field(lab, border_ring(lab.shape), order=1)
    rough = largest_region(np.linalg.norm(lab - field, axis=2) > 18.0)
    if rough is None:
        return None, np.median(lab.reshape(-1, 3), axis=0)
    outside = ~cv2.dilate(rough.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    if outside.sum() >= 0.1 * outside.size:
        field = background_field(lab, outside, order=2)
    dist = np.linalg.norm(lab - field, axis=2)
    gap = np.linalg.norm(np.median(lab[rough], axis=0) - np.median(field[rough], axis=0))
    mask = largest_region(dist > float(np.clip(0.5 * gap, 10.0, 60.0)))
    bg = np.median(lab[~mask] if mask is not None and (~mask).any() else lab.reshape(-1, 3), axis=0)
    if mask is None or not MIN_AREA <= mask.mean() <= MAX_AREA:
        return None, bg
    return mask, bg


def radial_harmonics(mask: np.ndarray) -> np.ndarray:
    """Strength of the 3-, 4- and 5-fold symmetry of the outline (triangle, square/diamond, star): Fourier
    magnitudes of the centroid-to-outline distance over the angle, relative to the mean distance."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    pts = max(contours, key=len)[:, 0, :].astype(np.float64)
    ys, xs = np.nonzero(mask)
    d = pts - [xs.mean(), ys.mean()]
    angle, radius = np.arctan2(d[:, 1], d[:, 0]), np.hypot(d[:, 0], d[:, 1])
    order = np.argsort(angle)
    grid = np.linspace(-np.pi, np.pi, 64, endpoint=False)
    profile = np.interp(grid, angle[order], radius[order], period=2 * np.pi)
    spectrum = np.abs(np.fft.rfft(profile)) / max(np.abs(np.fft.rfft(profile))[0], 1e-9)
    return spectrum[3:6] * 2  # x2: a one-sided spectrum splits each harmonic's amplitude


def shape_features(mask: np.ndarray) -> np.ndarray:
    """(bounding-box fill, convex-hull fill, centroid height within the box, 3-/4-/5-fold symmetry)."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    area = float(mask.sum())
    hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.int32))
    hull_area = max(cv2.contourArea(hull) + 0.5 * cv2.arcLength(hull, True), 1.0)  # pixel centres -> areas
    box = [area / ((x1 - x0) * (y1 - y0)), min(area / hull_area, 1.0), (ys.mean() + 0.5 - y0) / (y1 - y0)]
    return np.concatenate([box, radial_harmonics(mask)])


@lru_cache(maxsize=1)
def shape_prototypes() -> tuple[tuple[str, ...], np.ndarray]:
    """Features of the renderer's own shapes (64 px, three sizes) as the reader segments them: per shape, one
    prototype row crisp and one per PROTOTYPE_BLURS (a model's decoder softens points and corners: through
    the world model's VAE alone, a crisp-only reader read 68% of stars and 87% of diamonds right, 78% and 91%
    with the blurred rows; circles, squares and triangles 98-100% either way)."""
    from diffray.world.grammar import Scene
    from diffray.world.render import render

    names, rows = [], []
    for shape in SHAPES:
        for sigma in (0.0,) + PROTOTYPE_BLURS:
            feats = []
            for r in (0.16, 0.25, 0.34):
                a = np.asarray(render(Scene("shape", "white", shape, "black", r, 0.5, 0.5), 64))
                if sigma:
                    a = np.clip(cv2.GaussianBlur(a.astype(np.float32), (0, 0), sigma), 0, 255).astype(np.uint8)
                feats.append(shape_features(segment(to_lab(smooth(a)))[0]))
            names.append(shape)
            rows.append(np.mean(feats, axis=0))
    return tuple(names), np.stack(rows)


def classify_shape(mask: np.ndarray) -> str:
    names, protos = shape_prototypes()
    d = np.linalg.norm((protos - shape_features(mask)) / FEATURE_SCALE, axis=1)
    return names[int(np.argmin(d))]


def _to_segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Lab distance from p to the segment a-b: how well p is a mix of colours a and b."""
    t = float(np.clip(np.dot(p - a, b - a) / max(float(np.dot(b - a, b - a)), 1e-9), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * (b - a))))


def striped_body(group_a: np.ndarray, group_b: np.ndarray, a_share: float) -> str:
    """The body colour of a striped shape from its two pixel groups' colours: the palette colour c that,
    with its stripe colour s (the world's rule), best explains one group as mostly c mixed with s and the
    other as mostly s mixed with c (blur mixes them). Between equal fits (black/white) the larger group wins."""
    names, pal = palette_lab()
    best, best_cost = names[0], np.inf
    for c, c_lab in zip(names, pal):
        s_lab = pal[names.index(STRIPE_COLOUR[c])]
        mid = (c_lab + s_lab) / 2
        for body, stripe, share in ((group_a, group_b, a_share), (group_b, group_a, 1.0 - a_share)):
            cost = _to_segment(body, c_lab, mid) + _to_segment(stripe, s_lab, mid) + (share < 0.5)
            if cost < best_cost:
                best, best_cost = c, cost
    return best


def stripe_wave(pixels: np.ndarray, ys: np.ndarray, xs: np.ndarray, side: int) -> tuple[float, float, np.ndarray]:
    """Fit of diagonal stripes to interior pixels: (amplitude in Lab units, share of the variance left by
    an offset + linear shading fit that the stripes explain, the fitted wave at each pixel). The colour is
    reduced to its main axis of variation, then a sinusoid across each diagonal is fitted at periods near
    the world's; the strongest fit wins."""
    centred = pixels - pixels.mean(axis=0)
    v = centred @ np.linalg.eigh(np.einsum("ni,nj->ij", centred, centred))[1][:, -1]  # main axis
    base = np.stack([np.ones_like(xs), xs / side, ys / side], axis=1)
    rest = v - base @ least_squares(base, v)
    rest_ss = float(rest @ rest) + 1e-9
    best = (0.0, 0.0, np.zeros_like(v))
    for u in ((xs + ys) / np.sqrt(2), (xs - ys) / np.sqrt(2)):
        for period in STRIPE_PERIOD * side * np.array([0.8, 0.9, 1.0, 1.1, 1.25]):
            phase = 2 * np.pi * u / period
            design = np.concatenate([np.stack([np.cos(phase), np.sin(phase)], axis=1), base], axis=1)
            coef = least_squares(design, v)
            resid = v - design @ coef
            amplitude = float(np.hypot(*coef[:2]))
            if amplitude > best[0]:
                best = (amplitude, max(0.0, 1.0 - float(resid @ resid) / rest_ss), design[:, :2] @ coef[:2])
    return best


def interior(mask: np.ndarray) -> np.ndarray:
    """The mask eroded by two pixels (one, or none, when too little would be left): pixels clear of the
    blurred edge."""
    for steps in (2, 1):
        inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=steps).astype(bool)
        if inner.sum() >= max(0.25 * mask.sum(), 16):
            return inner
    return mask


def fill_colour(lab: np.ndarray, mask: np.ndarray) -> tuple[str, bool]:
    """(the shape's colour, striped?) from the mask's interior: striped when a diagonal wave at the stripe
    period is strong and explains much of the colour's variation."""
    region = interior(mask)
    ys, xs = np.nonzero(region)
    pixels = lab[region]
    amplitude, explained, wave = stripe_wave(pixels, ys.astype(float), xs.astype(float), mask.shape[0])
    if amplitude < STRIPE_AMPLITUDE or explained < STRIPE_EXPLAINED:
        return nearest_colour(np.median(pixels, axis=0)), False
    crest = np.abs(wave) >= 0.5 * amplitude  # the purest pixels of each band: least mixed by blur
    if not (crest & (wave > 0)).any() or not (crest & (wave < 0)).any():
        return nearest_colour(np.median(pixels, axis=0)), False
    a_lab = np.median(pixels[crest & (wave > 0)], axis=0)
    b_lab = np.median(pixels[crest & (wave < 0)], axis=0)
    a_share = np.mean(np.linalg.norm(pixels - a_lab, axis=1) < np.linalg.norm(pixels - b_lab, axis=1))
    return striped_body(a_lab, b_lab, float(a_share)), True


def region_of(cx: float, cy: float) -> str | None:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTRE_BAND:
        return None
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"


def read_scene(image) -> Reading:
    """Read one image (PIL or uint8 array, any size). Background is always read; the other fields are
    None when no single shape stands out from the background."""
    rgb = as_rgb(image)
    lab = to_lab(rgb)
    mask, bg = segment(to_lab(smooth(rgb)))
    reading = Reading(bg=nearest_colour(bg))
    if mask is None:
        return reading
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h
    r = max((xs.max() + 1 - xs.min()) / w, (ys.max() + 1 - ys.min()) / h) / 2
    colour, striped = fill_colour(lab, mask)
    return Reading(bg=reading.bg, colour=colour, shape=classify_shape(mask), striped=striped, cx=float(cx),
                   cy=float(cy), r=float(r), region=region_of(cx, cy), size="small" if r < SIZE_SPLIT else "large",
                   mask=mask)
