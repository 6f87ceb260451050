"""Preference pairs drawn by the shapes world, in Pick-a-Pic's columns (caption, jpg_0, jpg_1, label_0,
label_1): for each prompt the preferred image is the prompt's scene and the other the same scene with the
shape in another colour, stored in a seeded random order with labels that say which is which. A labeller
that knows the right answer, without a model: the sample set of `method: diffusion_dpo`
(`builtin:sample/pairs`). Same seed => the same rows. Never imports ray.
"""

from __future__ import annotations

import random
from pathlib import Path

from diffray.world.grammar import BACKGROUNDS, PRETRAIN_COLOURS, PRETRAIN_SHAPES, Scene, caption
from diffray.world.render import png_bytes, render

PAIR_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def _png(colour: str, shape: str, bg: str, resolution: int) -> bytes:
    return png_bytes(render(Scene("shape", colour, shape, bg, r=0.3, cx=0.5, cy=0.5), resolution))


def colour_pairs(count: int, seed: int, resolution: int = 64) -> list[dict]:
    """`count` rows {caption, jpg_0, jpg_1, label_0, label_1, preferred} (`preferred`: the preferred image's
    PNG bytes, not a Pick-a-Pic column)."""
    rng, rows = random.Random(seed), []
    for _ in range(count):
        shape, bg = rng.choice(PRETRAIN_SHAPES), rng.choice(BACKGROUNDS)
        good, bad = rng.sample([c for c in PRETRAIN_COLOURS if c != bg], 2)
        won, lost = _png(good, shape, bg, resolution), _png(bad, shape, bg, resolution)
        first = rng.random() < 0.5
        rows.append({"caption": caption(good, shape, bg), "jpg_0": won if first else lost,
                     "jpg_1": lost if first else won, "label_0": float(first), "label_1": float(not first),
                     "preferred": won})
    return rows


def write_pairs(rows: list[dict], path: str | Path, row_group_size: int = 1_000, extra: tuple[str, ...] = ()) -> Path:
    """The rows' Pick-a-Pic columns (and the boolean columns `extra`) as one Parquet file (image cells as
    bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64()), *((k, pa.bool_()) for k in extra)])
    table = pa.Table.from_pylist([{k: r[k] for k in (*PAIR_COLUMNS, *extra)} for r in rows], schema=schema)
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return Path(path)
