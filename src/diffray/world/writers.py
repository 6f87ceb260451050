"""Write world datasets: an HF imagefolder (PNGs + metadata.jsonl) or Parquet shards (PNG bytes, caption
and every scene field as columns), of any size, built in a temporary sibling and renamed into place so a
reader never sees half a dataset. Also the cached `builtin:world/<split>` sets. Never imports ray.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from diffray.errors import ConfigError
from diffray.paths import cache_dir, check_replaceable
from diffray.world.render import png_bytes, render
from diffray.world.scenes import SIZE_WORD_P, SPLITS, check_split, scene_at

WORLD_VERSION = 1  # bump when a rendering or a split changes, so cached sets are rebuilt
FORMATS = ("imagefolder", "parquet")
BUILTIN_SIZES = {"pretrain": 256, "heldout": 64, "base": 64, "star": 64, "star_mix": 128, "triangle": 64, "cyan": 64, "striped": 64, "subject": 5,
                 "all": 256, "canny": 256}
BUILTIN_SEED = 0
ROWS_PER_FILE = 10_000  # Parquet: rows per shard file
ROWS_PER_GROUP = 1_000  # Parquet: rows per row group (a Ray read task each)


@contextmanager
def atomic_dir(out: str | Path, marker: str) -> Iterator[Path]:
    """A fresh temporary sibling of `out` to fill; on success it replaces `out` (old contents removed).
    `marker` is the file the caller writes into every folder it makes: an existing non-empty `out` without it
    is refused before any work (`check_replaceable`)."""
    check_replaceable(out, marker)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = tmp.with_name(tmp.name + "-old")
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; datasets are meant to be shared
        yield tmp
        if out.exists():
            os.replace(out, old)  # a directory cannot be replaced onto a non-empty one
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _rows(split: str, num_images: int, seed: int, resolution: int, size_p: float,
          position_p: float) -> Iterator[tuple[int, dict, bytes]]:
    for i in range(num_images):
        scene = scene_at(seed, split, i, size_p, position_p)
        yield i, {"text": scene.caption, "index": i, **scene.fields()}, png_bytes(render(scene, resolution))


def _write_imagefolder(root: Path, rows) -> None:
    with (root / "metadata.jsonl").open("w") as f:
        for i, meta, data in rows:
            name = f"{i:08d}.png"
            (root / name).write_bytes(data)
            f.write(json.dumps({"file_name": name, **meta}) + "\n")


def _write_parquet(root: Path, rows) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def flush(batch: list, part: int) -> None:
        cols = {"image": pa.array([b for _, _, b in batch], type=pa.binary())}
        for key in batch[0][1]:
            cols[key] = pa.array([m[key] for _, m, _ in batch])
        pq.write_table(pa.table(cols), root / f"part-{part:05d}.parquet", row_group_size=ROWS_PER_GROUP)

    batch, part = [], 0
    for row in rows:
        batch.append(row)
        if len(batch) == ROWS_PER_FILE:
            flush(batch, part)
            batch, part = [], part + 1
    if batch:
        flush(batch, part)


def check_options(num_images: int, resolution: int, fmt: str, size_p: float, position_p: float) -> None:
    """ConfigError naming the first bad option."""
    if num_images < 1:
        raise ConfigError(f"must be >= 1, got {num_images}", field="num_images")
    if resolution < 8:
        raise ConfigError(f"must be >= 8, got {resolution}", field="resolution")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r} (allowed: {', '.join(FORMATS)})", field="format")
    for name, p in (("size_p", size_p), ("position_p", position_p)):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"must be a probability in [0, 1], got {p}", field=name)


def write_world_dataset(out: str | Path, split: str = "pretrain", num_images: int = 1000, seed: int = 0,
                        resolution: int = 64, fmt: str = "imagefolder", size_p: float = SIZE_WORD_P,
                        position_p: float = SIZE_WORD_P) -> Path:
    """Write `num_images` scenes 0..N-1 of `split` under `seed` to `out` (replaced if it exists) as an
    imagefolder (`metadata.jsonl` rows {file_name, text, index, scene fields}) or Parquet shards
    (`part-NNNNN.parquet`: image PNG bytes, text, index, scene fields), plus `dataset.json`. Returns `out`.

    Raises:
        ConfigError: an unknown split or format, or an option out of range (naming it).
    """
    check_split(split)
    check_options(num_images, resolution, fmt, size_p, position_p)
    with atomic_dir(out, "dataset.json") as tmp:
        rows = _rows(split, num_images, seed, resolution, size_p, position_p)
        (_write_parquet if fmt == "parquet" else _write_imagefolder)(tmp, rows)
        info = {"name": f"diffray-world/{split}", "world_version": WORLD_VERSION, "split": split,
                "about": SPLITS[split].about, "seed": seed, "num_images": num_images, "resolution": resolution,
                "format": fmt, "size_p": size_p, "position_p": position_p}
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return Path(out).resolve()


def builtin_world(split: str) -> Path:
    """The cached `builtin:world/<split>` imagefolder (BUILTIN_SIZES[split] images, seed 0, 64 px), built
    once under a file lock. `canny`: `pretrain` scenes paired with their Canny maps (ControlNet), only
    those whose map traces the shape's outline."""
    if split != "canny":
        check_split(split)
    root = cache_dir() / "data" / f"world-v{WORLD_VERSION}-{split}-seed{BUILTIN_SEED}"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if (root / "dataset.json").is_file():
            return root
        if split != "canny":
            return write_world_dataset(root, split, BUILTIN_SIZES[split], BUILTIN_SEED)
        from diffray.world.suites import write_canny_pairs

        with atomic_dir(root, "dataset.json") as tmp:
            write_canny_pairs(tmp, BUILTIN_SIZES[split], BUILTIN_SEED)
            info = {"name": "diffray-world/canny", "world_version": WORLD_VERSION, "split": "pretrain",
                    "conditioning": "canny", "seed": BUILTIN_SEED, "num_images": BUILTIN_SIZES[split]}
            (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return root
