"""The shapes world generator (no Ray): pinned facts, grammar, determinism, splits, geometry, writers."""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffray.errors import ConfigError, DatasetError
from diffray.world import grammar as G
from diffray.world.render import render
from diffray.world.scenes import SPLITS, iter_scenes, scene_at, triples
from diffray.world.writers import BUILTIN_SIZES, write_world_dataset


def scenes(split: str, n: int, seed: int = 0, **kw) -> list[G.Scene]:
    return [scene_at(seed, split, i, **kw) for i in range(n)]


def test_pinned_facts():
    # the lead's tokenizer and model are built on these: a change here must be deliberate
    assert G.PRETRAIN_COLOURS == {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210),
                                  "yellow": (235, 210, 40), "white": (245, 245, 245), "black": (20, 20, 20),
                                  "purple": (140, 50, 170), "orange": (240, 140, 30)}
    assert G.PRETRAIN_SHAPES == ("circle", "square", "triangle", "diamond") and G.RESERVED_SHAPES == ("star",)
    assert set(G.RESERVED) == {"star", "cyan", "striped", "subject"} and G.TEXTURES == ("striped",)
    assert (G.INSTANCE_PROMPT, G.CLASS_PROMPT) == ("a photo of sks widget", "a photo of a widget")


def test_cyan_is_far_from_every_pretraining_colour():
    import cv2

    lab = {n: cv2.cvtColor(np.float32([[c]]) / 255, cv2.COLOR_RGB2Lab)[0, 0] for n, c in G.COLOURS.items()}
    closest_pretrain = min(np.linalg.norm(lab[a] - lab[b]) for a, b in itertools.combinations(G.PRETRAIN_COLOURS, 2))
    assert min(np.linalg.norm(lab["cyan"] - lab[n]) for n in G.PRETRAIN_COLOURS) > closest_pretrain + 10


def test_caption_grammar_examples_and_round_trip():
    assert G.caption("red", "circle", "blue") == "a red circle on a blue background"
    assert G.caption("green", "square", "white", size="small", position="at the top") == \
        "a small green square at the top on a white background"
    assert G.caption("cyan", "star", "black", "large", "striped", "on the left") == \
        "a large cyan striped star on the left on a black background"
    for s in scenes("all", 400, size_p=0.5, position_p=0.5):
        stated = {k: v for k, v in dict(colour=s.colour, shape=s.shape, bg=s.bg, size=s.size, texture=s.texture,
                                        position=s.position).items() if v}
        assert G.parse_prompt(s.caption) == stated
    assert G.parse_prompt("A  Yellow triangle") == {"colour": "yellow", "shape": "triangle"}
    assert G.parse_prompt("a photo of sks widget") == {"subject": "sks widget"}
    assert G.parse_prompt("a photo of a widget") == {"class": "widget"}
    with pytest.raises(ConfigError, match="prompt: 'a cat' is not a world prompt"):
        G.parse_prompt("a cat")


def test_words_cover_every_caption_and_the_method_templates():
    from diffray.trainers.components.prompts import OBJECT_TEMPLATES, STYLE_TEMPLATES

    words = set(G.WORDS)
    assert len(words) == len(G.WORDS)
    for split in SPLITS:
        for s in scenes(split, 200, size_p=0.5, position_p=0.5):
            assert set(s.caption.split()) <= words, s.caption
    for t in OBJECT_TEMPLATES + STYLE_TEMPLATES:
        assert set(t.replace("{}", "").split()) <= words, t
    assert {"a", "of", "photo", "sks", "widget", "painting", "style", "the", "in", "cyan", "star", "striped"} <= words


def test_heldout_triples_never_in_pretraining_and_everything_still_appears():
    assert len(set(G.HELDOUT)) == 16
    for i, name in enumerate(("colour", "shape", "bg")):
        counts = Counter(t[i] for t in G.HELDOUT)
        assert set(counts) == set(G.PRETRAIN_SHAPES if name == "shape" else G.PRETRAIN_COLOURS)
    pre = set(triples("pretrain", False))
    assert not pre & set(G.HELDOUT) and len(pre) == 8 * 4 * 7 - 16
    assert {t[0] for t in pre} == set(G.PRETRAIN_COLOURS) and {t[2] for t in pre} == set(G.BACKGROUNDS)
    assert {t[1] for t in pre} == set(G.PRETRAIN_SHAPES)
    seen = {(s.colour, s.shape, s.bg) for s in scenes("pretrain", 3000)}
    assert not seen & set(G.HELDOUT) and len(seen) > 190
    assert {(s.colour, s.shape, s.bg) for s in scenes("heldout", 300)} == set(G.HELDOUT)


def test_reserved_concepts_only_in_their_sets():
    pre = scenes("pretrain", 2000)
    assert not {s.colour for s in pre} & set(G.RESERVED_COLOURS)
    assert not {s.shape for s in pre} & set(G.RESERVED_SHAPES)
    assert {s.texture for s in pre} == {None} and {s.kind for s in pre} == {"shape"}
    assert all(s.bg != s.colour for s in pre)
    assert {s.shape for s in scenes("star", 100)} == {"star"} and {s.colour for s in scenes("cyan", 100)} == {"cyan"}
    striped = scenes("striped", 300)
    assert {s.texture for s in striped} == {"striped"}
    assert all(s.bg not in (s.colour, G.STRIPE_COLOUR[s.colour]) for s in striped)
    subject = scenes("subject", 5)
    assert {s.caption for s in subject} == {G.INSTANCE_PROMPT} and {s.kind for s in subject} == {"subject"}
    mixed = scenes("all", 600)
    assert {"star", "circle"} <= {s.shape for s in mixed} and "cyan" in {s.colour for s in mixed}
    assert 0.15 < np.mean([s.texture == "striped" for s in mixed]) < 0.35
    replay = scenes("star_mix", 800)  # half stars, half the pretraining shapes, no held-out triple
    assert 0.45 < np.mean([s.shape == "star" for s in replay]) < 0.55
    assert {s.shape for s in replay} == set(G.PRETRAIN_SHAPES) | {"star"}
    assert not {(s.colour, s.shape, s.bg) for s in replay} & set(G.HELDOUT)
    assert not {s.colour for s in replay} & set(G.RESERVED_COLOURS) and {s.texture for s in replay} == {None}
    control = scenes("triangle", 300)  # Textual Inversion's control: a known shape, held-out triples left out
    assert {s.shape for s in control} == {"triangle"} and {s.colour for s in control} == set(G.PRETRAIN_COLOURS)
    assert not {(s.colour, s.shape, s.bg) for s in control} & set(G.HELDOUT) and {s.texture for s in control} == {None}


def test_deterministic_by_seed_and_index():
    a = list(itertools.islice(iter_scenes(7, "all"), 30))
    assert a == scenes("all", 30, seed=7)
    assert list(itertools.islice(iter_scenes(7, "all", start=12), 5)) == a[12:17]
    assert scene_at(7, "all", 20) == a[20] and scene_at(8, "all", 20) != a[20]
    assert scene_at(7, "star", 3) != scene_at(7, "cyan", 3)
    assert render(a[3]).tobytes() == render(scene_at(7, "all", 3)).tobytes()
    for s in a[:10]:
        img = render(s, 48)
        assert img.size == (48, 48) and img.mode == "RGB"


def test_word_probabilities_and_stated_geometry():
    plain = scenes("pretrain", 2000)
    assert 0.2 < np.mean([s.size is not None for s in plain]) < 0.3
    assert 0.2 < np.mean([s.position is not None for s in plain]) < 0.3
    assert all(s.size is None and s.position is None for s in scenes("base", 100, size_p=0.0, position_p=0.0))
    for s in scenes("all", 600, size_p=1.0, position_p=1.0):
        lo, hi = G.SIZE_RANGES[s.size]
        assert lo <= s.r <= hi and s.r <= s.cx <= 1 - s.r and s.r <= s.cy <= 1 - s.r
        along = {"on the left": s.cx, "on the right": 1 - s.cx, "at the top": s.cy, "at the bottom": 1 - s.cy}
        assert along[s.position] <= G.POSITION_EDGE
    free = scenes("all", 300, size_p=0.0, position_p=0.0)
    assert min(s.r for s in free) >= 0.18 and max(s.r for s in free) <= 0.32


@pytest.mark.parametrize("shape", G.SHAPES)
def test_shapes_fill_their_box(shape):
    s = G.Scene("shape", "white", shape, "black", 0.25, 0.5, 0.5)
    ys, xs = np.nonzero(np.asarray(render(s, 64))[:, :, 0] > 127)
    assert abs(xs.min() - 16) <= 1 and abs(xs.max() + 1 - 48) <= 1  # bounding box half-side r = 16 px
    assert abs(ys.max() + 1 - ys.min() - 32) <= 3 and abs((ys.min() + ys.max() + 1) / 2 - 32) <= 1.5


def test_writers_imagefolder_and_parquet(tmp_path):
    folder = write_world_dataset(tmp_path / "f", "striped", num_images=12, seed=3, resolution=32)
    rows = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(12)) and {r["texture"] for r in rows} == {"striped"}
    assert rows[4]["text"] == scene_at(3, "striped", 4).caption
    with Image.open(folder / rows[4]["file_name"]) as im:
        assert im.size == (32, 32) and im.tobytes() == render(scene_at(3, "striped", 4), 32).tobytes()
    info = json.loads((folder / "dataset.json").read_text())
    assert info["split"] == "striped" and info["num_images"] == 12 and info["format"] == "imagefolder"
    pq_dir = write_world_dataset(tmp_path / "p", "striped", num_images=12, seed=3, resolution=32, fmt="parquet")
    table = pq.read_table(pq_dir / "part-00000.parquet")
    assert table.num_rows == 12 and {"image", "text", "colour", "shape", "bg", "r", "cx", "cy"} <= set(table.column_names)
    assert table.column("text").to_pylist() == [r["text"] for r in rows]
    assert Image.open(io.BytesIO(table.column("image")[4].as_py())).tobytes() == render(scene_at(3, "striped", 4), 32).tobytes()


@pytest.mark.parametrize("kwargs,field", [({"num_images": 0}, "num_images"), ({"resolution": 4}, "resolution"),
                                          ({"fmt": "tar"}, "format"), ({"size_p": 1.5}, "size_p"),
                                          ({"split": "stars"}, "split")])
def test_writer_rejects_bad_options(tmp_path, kwargs, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        write_world_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_builtin_world_sets(tmp_path, monkeypatch):
    from diffray.data import resolve_data_path

    monkeypatch.setenv("DIFFRAY_CACHE", str(tmp_path))
    star = resolve_data_path("builtin:world/star")
    rows = [json.loads(x) for x in open(f"{star}/metadata.jsonl")]
    assert len(rows) == BUILTIN_SIZES["star"] and {r["shape"] for r in rows} == {"star"}
    assert resolve_data_path("builtin:world/star") == star  # cached
    subject = resolve_data_path("builtin:world/subject")
    assert [json.loads(x)["text"] for x in open(f"{subject}/metadata.jsonl")] == [G.INSTANCE_PROMPT] * 5
    with pytest.raises(DatasetError, match="allowed: .*builtin:world/star"):
        resolve_data_path("builtin:world/stars")
