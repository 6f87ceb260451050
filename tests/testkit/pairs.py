"""Preference-pair Parquet files for tests: the world's colour pairs (`diffray.world.pairs`) followed by
pairs without a preference and pairs with a broken second image."""

from __future__ import annotations

from pathlib import Path

from diffray.world.pairs import colour_pairs
from diffray.world.pairs import write_pairs as write_parquet


def write_pairs(path: str | Path, pairs: int, seed: int, ties: int = 0, both_bad: int = 0,
                corrupt_second: int = 0, resolution: int = 64) -> list[dict]:
    """Write `pairs` labelled pairs, then `ties` (0.5/0.5), `both_bad` (0/0) and `corrupt_second` pairs whose
    second image is not an image (row groups of 8). Returns the rows as written, each with `preferred`
    (the preferred image's bytes, None without a preference)."""
    rows = colour_pairs(pairs + ties + both_bad + corrupt_second, seed, resolution)
    for i, row in enumerate(rows):
        if i >= pairs + ties + both_bad:
            row.update(jpg_1=b"not an image", label_0=1.0, label_1=0.0, preferred=row["jpg_0"])
        elif i >= pairs + ties:
            row.update(label_0=0.0, label_1=0.0, preferred=None)
        elif i >= pairs:
            row.update(label_0=0.5, label_1=0.5, preferred=None)
    write_parquet(rows, path, row_group_size=8)
    return rows
