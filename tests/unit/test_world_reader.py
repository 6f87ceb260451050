"""The world reader and scores against ground truth (no Ray): the generator's own images, degraded copies
(what a small diffusion model draws), noise, ControlNet agreement, subject fidelity, JPEG size."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from diffray.world import grammar as G
from diffray.world.reader import read_scene
from diffray.world.render import render
from diffray.world.scenes import scene_at
from diffray.world.scores import (accuracy_table, alignment, control_mask, edge_f1, jpeg_kb, outline_coverage, score,
                                  shape_iou, subject_fidelity)

# Per-field accuracy of a reader that ignores the image, for prompts of the `all` split (uniform over
# the named values; position: a centre drawn uniformly satisfies a stated side 45% of the time).
CHANCE = {"bg": 1 / 8, "colour": 1 / 9, "shape": 1 / 5, "texture": 1 / 2, "size": 1 / 2, "position": 0.45}


def truth_checks(scene: G.Scene, image) -> dict[str, bool]:
    """Every field of the reading against the scene (not only what the caption states)."""
    rd = read_scene(image)
    out = {"bg": rd.bg == scene.bg, "colour": rd.colour == scene.colour, "shape": rd.shape == scene.shape,
           "texture": rd.striped == (scene.texture == "striped"),
           "centre": rd.cx is not None and max(abs(rd.cx - scene.cx), abs(rd.cy - scene.cy)) < 0.04,
           "radius": rd.r is not None and abs(rd.r - scene.r) < 0.04}
    stated = score(image, scene.caption, reading=rd)
    out["caption"] = all(stated.values()) and len(stated) >= 3
    return out


def field_accuracy(pairs) -> dict[str, float]:
    rows = [truth_checks(s, img) for s, img in pairs]
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def world_sample(n_per_split: int, seed: int):
    for split in ("all", "pretrain", "heldout", "star", "cyan", "striped"):
        for i in range(n_per_split):
            yield scene_at(seed, split, i)


def degrade(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Blur (1 px), an off colour cast (+-10), uneven shading (a smooth field, sd 6 per channel), pixel
    noise (6), four specks, JPEG at quality 85."""
    a = cv2.GaussianBlur(np.asarray(img).astype(np.float32), (0, 0), 1.0)
    shading = cv2.resize(rng.normal(0, 6, size=(3, 3, 3)).astype(np.float32), a.shape[:2], interpolation=cv2.INTER_CUBIC)
    a = a + rng.uniform(-10, 10, size=3) + shading + rng.normal(0, 6, a.shape)
    for _ in range(4):
        y, x = rng.integers(0, a.shape[0] - 2, size=2)
        a[y:y + 2, x:x + 2] = rng.integers(0, 256, size=3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return Image.open(buf).convert("RGB")


def test_reads_the_generators_own_images():
    acc = field_accuracy((s, render(s)) for s in world_sample(60, seed=11))
    assert min(acc.values()) >= 0.98, acc


def test_reads_degraded_images():
    rng = np.random.default_rng(0)
    acc = field_accuracy((s, degrade(render(s), rng)) for s in world_sample(40, seed=12))
    assert min(acc.values()) >= 0.95, acc


@pytest.mark.parametrize("shape", G.SHAPES)
def test_every_size_and_position_reads_back(shape):
    for size in G.SIZES:
        r = float(np.mean(G.SIZE_RANGES[size]))
        near = (r + G.POSITION_EDGE) / 2
        for position, (cx, cy) in {"on the left": (near, 0.5), "on the right": (1 - near, 0.5),
                                   "at the top": (0.5, near), "at the bottom": (0.5, 1 - near)}.items():
            for texture in (None, "striped"):
                scene = G.Scene("shape", "yellow", shape, "blue", r, cx, cy, texture, size, position)
                checks = score(render(scene), scene.caption)
                want = {"size", "colour", "shape", "position", "bg"} | ({"texture"} if texture else set())
                assert set(checks) == want and all(checks.values()), (scene.caption, checks)
                assert read_scene(render(scene)).region == position


def noise_images(kind: str, n: int, rng: np.random.Generator):
    for _ in range(n):
        if kind == "uniform":
            yield Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))
        else:  # smooth colour blobs, like a random diffusion model's output
            small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
            yield Image.fromarray(small).resize((64, 64), Image.Resampling.BICUBIC)


@pytest.mark.parametrize("kind", ["uniform", "smooth"])
def test_noise_scores_near_chance(kind):
    rng = np.random.default_rng(1)
    prompts = [scene_at(13, "all", i, size_p=0.5, position_p=0.5).caption for i in range(300)]
    rows = [score(img, p) for img, p in zip(noise_images(kind, 300, rng), prompts)]
    table = accuracy_table(rows)
    for name, chance in CHANCE.items():
        assert table[name]["total"] >= 30
        # 0.1 above chance is > 3 standard errors for 300 (texture: ~75) scored prompts
        assert table[name]["accuracy"] <= chance + 0.1, (name, table[name])


def test_score_scores_only_stated_fields():
    img = render(G.Scene("shape", "red", "circle", "blue", 0.25, 0.5, 0.5))
    assert score(img, "a red circle on a blue background") == {"colour": True, "shape": True, "bg": True}
    assert score(img, "a green circle") == {"colour": False, "shape": True}
    assert score(img, "a small red striped circle on the left on a blue background") == {
        "size": False, "colour": True, "texture": False, "shape": True, "position": False, "bg": True}
    assert score(img, "a photo of a widget") == {}
    assert alignment(img, "a red square on a blue background") == pytest.approx(2 / 3)
    table = accuracy_table([{"colour": True, "shape": False}, {"colour": True}])
    assert table["colour"]["accuracy"] == 1.0 and table["shape"]["total"] == 1
    assert table["all"] == {"right": 1, "total": 2, "accuracy": 0.5}


def visible_pairs(seed: int, n: int):
    """(image, its canny map) of pretrain scenes whose map outlines the shape."""
    from diffray.data.conditioning import canny

    run = canny()
    out, i = [], 0
    while len(out) < n:
        img = render(scene_at(seed, "pretrain", i))
        control = run(img)
        if outline_coverage(control, img) >= 0.8:
            out.append((img, control))
        i += 1
    return out


def test_edge_f1_and_iou_of_control_maps():
    pairs = visible_pairs(14, 40)
    own = [edge_f1(c, img) for img, c in pairs]
    other = [edge_f1(c, pairs[(k + 1) % len(pairs)][0]) for k, (_, c) in enumerate(pairs)]
    assert min(own) >= 0.99 and np.mean(other) < 0.3, (min(own), np.mean(other))
    ious = [shape_iou(c, img) for img, c in pairs]
    assert min(ious) >= 0.7 and np.median(ious) >= 0.85
    blank = Image.new("RGB", (64, 64), (0, 0, 0))
    assert edge_f1(blank, blank) == 1.0 and edge_f1(pairs[0][1], blank) == 0.0
    assert shape_iou(pairs[0][1], blank) == 0.0 and not control_mask(blank).any()


def test_subject_fidelity_ranks_widgets_above_everything_else():
    widgets = [subject_fidelity(render(scene_at(15, "subject", i))) for i in range(40)]
    others = [subject_fidelity(render(s)) for s in world_sample(30, seed=15)]
    orange = [subject_fidelity(render(G.Scene("shape", "orange", shape, "white", 0.3, 0.5, 0.5, texture=t)))
              for shape in G.SHAPES for t in (None, "striped")]  # the widget's body colour, with and without stripes
    assert 0.85 <= np.mean(widgets) <= 1.15 and min(widgets) > 0.6
    assert max(others + orange) < 0.3 and min(widgets) > 2 * max(others + orange)
    assert score(render(scene_at(15, "subject", 0)), G.INSTANCE_PROMPT) == {"subject": True}
    refs = [render(scene_at(0, "subject", i)) for i in range(3)]
    assert subject_fidelity(render(scene_at(15, "subject", 1)), refs) > 0.6


def test_jpeg_size_matches_the_ddpo_reward():
    from diffray.trainers.components.rewards import jpeg_size_kb

    img = render(scene_at(0, "striped", 0))
    assert jpeg_kb(img) == jpeg_size_kb(img) and jpeg_kb(img) > jpeg_kb(render(scene_at(0, "pretrain", 0)))


def through_the_vae(scenes) -> list[Image.Image]:
    """The scenes' renders encoded (posterior mean) and decoded by the shipped model's VAE."""
    import torch
    from diffusers import AutoencoderKL

    from diffray.models.loading import resolve_model_path

    vae = AutoencoderKL.from_pretrained(resolve_model_path("builtin:tiny"), subfolder="vae").eval()
    x = torch.from_numpy(np.stack([np.asarray(render(s)) for s in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
    decoded = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(img) for img in decoded]


def test_shapes_through_the_world_models_vae_read_back():
    """The reader's shape prototypes cover what a decoder draws: world scenes encoded and decoded by the shipped
    model's VAE (the softest a trained UNet's image can be) keep their shape. Crisp-only prototypes read
    68% of these stars and 87% of the diamonds right (measured when the softened rows were added)."""
    scenes = [scene_at(5, "star", i) for i in range(96)] + [scene_at(5, "pretrain", i) for i in range(96)]
    right: dict[str, list[bool]] = {}
    for scene, img in zip(scenes, through_the_vae(scenes)):
        right.setdefault(scene.shape, []).append(read_scene(img).shape == scene.shape)
    acc = {k: float(np.mean(v)) for k, v in right.items()}
    # small stars (radius < 0.2) come back from the 8x-downsampling VAE as pentagons or discs: the ceiling
    assert acc["star"] >= 0.75 and min(acc[k] for k in G.PRETRAIN_SHAPES) >= 0.8, acc


def test_the_star_suites_ceiling_through_the_vae():
    """What `diffray eval --suite star` (64 prompts, suite seed 0) could read as stars from a UNet that drew
    every scene exactly: the scenes' own renders through the shipped VAE read back 41 of 64 (64%) as stars,
    under the LoRA floor of 70% (docs/world.md). Stars of radius >= 0.2 come back (~85%); smaller ones mostly
    as discs or pentagons (~26%), and this suite's 64 scenes hold 36% small ones (512 scenes: 26%, 73%)."""
    from diffray.world.suites import EVAL_SEED, SUITE_SPLIT

    scenes = [scene_at(EVAL_SEED, SUITE_SPLIT["star"], i) for i in range(64)]
    assert all(read_scene(render(s)).shape == "star" for s in scenes)  # crisp, the reader reads every one
    read = [read_scene(img).shape == "star" for img in through_the_vae(scenes)]
    small = [s.r < 0.2 for s in scenes]
    ceiling = float(np.mean(read))
    small_acc = float(np.mean([r for r, s in zip(read, small) if s]))
    large_acc = float(np.mean([r for r, s in zip(read, small) if not s]))
    assert 39 <= sum(read) <= 43 and ceiling < 0.7, (sum(read), ceiling)  # 41 here; +-2 for float drift
    assert sum(small) == 23 and small_acc < 0.4 and large_acc > 0.8, (sum(small), small_acc, large_acc)


def test_the_subject_suites_ceiling_through_the_vae():
    """What DreamBooth could score on `diffray eval --suite subject` through the shipped VAE: the widget's own
    images (the 5 training images of `builtin:world/subject`, and 20 more scenes) encoded and decoded score a
    mean fidelity of ~0.05 (0-0.166 each; their crisp renders 0.75-1.05), under the floor of 3x the base's 0.026
    (EVALS.md). The VAE never saw the subject: its stripes blur away and its pastel backgrounds shift
    (docs/world.md)."""
    scenes = [scene_at(0, "subject", i) for i in range(5)] + [scene_at(3, "subject", i) for i in range(20)]
    crisp = [subject_fidelity(render(s)) for s in scenes]
    decoded = [subject_fidelity(img) for img in through_the_vae(scenes)]
    assert min(crisp) > 0.7, crisp
    assert 0.03 <= float(np.mean(decoded)) <= 0.07 and float(np.mean(decoded[:5])) < 3 * 0.026, decoded


def test_the_jpeg_floors_reach_through_the_vae():
    """How small DDPO's JPEGs could get on `diffray eval --suite prompts` (64 prompts, suite seed 0) while drawing
    every scene: the scenes' own renders through the shipped VAE average 1.56 kB (quality 95), 4.7% under the
    base model's samples (1.640 kB, EVALS.md); every shape at the smallest `small` radius (0.14) 1.32 kB (-19.5%,
    and every `large` prompt wrong); the backgrounds alone 0.93 kB. The floor, 20% smaller with at most 10
    points of accuracy lost, lies about where the shapes stop being drawn as stated (README, DDPO)."""
    import dataclasses

    from diffray.world.suites import EVAL_SEED, SUITE_SPLIT

    scenes = [scene_at(EVAL_SEED, SUITE_SPLIT["prompts"], i) for i in range(64)]

    def mean_kb(scs) -> float:
        return float(np.mean([jpeg_kb(img) for img in through_the_vae(scs)]))

    exact, small = mean_kb(scenes), mean_kb([dataclasses.replace(s, r=0.14) for s in scenes])
    flat = mean_kb([dataclasses.replace(s, r=0.0) for s in scenes])
    assert 1.50 <= exact <= 1.62 and exact > 0.9 * 1.640, exact
    assert 1.25 <= small <= 1.38 and flat < 1.0 and flat < small < exact, (small, flat)
