"""Read an HF-style imagefolder (`metadata.jsonl` or `metadata.csv` + image files) into a Ray Dataset
and prepare it for training (decode, resize/crop/flip, normalize, tokenize) with `map_batches`.

The folder may be a local path or any pyarrow filesystem URI (`s3://`, `gs://`, `file://`). Metadata is
parsed and checked on the driver, so a bad folder fails at read time with a `DatasetError` naming the
file instead of deep inside a Ray task. This is the only data module that imports ray.
"""

from __future__ import annotations

import csv
import functools
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray.data

from diffray.data.transforms import preprocess_images, tokenize_captions
from diffray.errors import DatasetError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def open_folder(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and absolute root of `path` (absolute, so Ray workers in any cwd find it)."""
    if "://" in path:
        try:
            fs, root = pafs.FileSystem.from_uri(path)
        except pa.ArrowException as exc:  # unknown scheme, filesystem not built in, bad credentials
            raise DatasetError(f"{path}: cannot open dataset URI ({exc})") from None
        return fs, root.rstrip("/")
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def parse_metadata(name: str, text: str) -> list[tuple[int, dict]]:
    """(line number, record) pairs from metadata.jsonl or metadata.csv text; blank lines skipped."""
    if name.endswith(".csv"):
        # line 1 is the header; numbering is off only for quoted captions spanning lines
        return [(n, rec) for n, rec in enumerate(csv.DictReader(io.StringIO(text)), start=2)]
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{name}:{n}: invalid JSON ({exc.msg})") from None
    return records


def read_metadata(fs: pafs.FileSystem, root: str, caption_column: str, image_column: str) -> tuple[str, list[dict]]:
    """The metadata file and its rows {sample_id, source, caption, line} in file order."""
    infos = fs.get_file_info([f"{root}/{name}" for name in METADATA_FILES])
    meta = next((i.path for i in infos if i.type == pafs.FileType.File), None)
    if meta is None:
        raise DatasetError(f"{root}: no metadata.jsonl or metadata.csv (expected an imagefolder with "
                           f"{image_column}/{caption_column} columns)")
    with fs.open_input_stream(meta) as f:
        records = parse_metadata(meta, f.read().decode("utf-8"))
    rows = []
    for n, rec in records:
        for col in (image_column, caption_column):
            if col not in rec:
                raise DatasetError(f"{meta}:{n}: missing column {col!r} (has: {', '.join(sorted(map(str, rec)))})")
        rows.append({"sample_id": len(rows), "source": str(rec[image_column]), "caption": str(rec[caption_column]),
                     "line": n})
    if not rows:
        raise DatasetError(f"{meta}: no rows")
    return meta, rows


def check_rows(fs: pafs.FileSystem, root: str, meta: str, rows: list[dict]) -> list[dict]:
    """Every referenced image must exist. The seam for fuller validation / quarantine of bad rows."""
    infos = fs.get_file_info([f"{root}/{r['source']}" for r in rows])
    for row, info in zip(rows, infos):
        if info.type != pafs.FileType.File:
            raise DatasetError(f"{meta}:{row['line']}: image file not found: {info.path}")
    return [{k: v for k, v in r.items() if k != "line"} for r in rows]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(fs: pafs.FileSystem, root: str, prompt: str) -> list[dict]:
    """Rows for a plain folder of images (no metadata file), every caption `prompt`, in name order."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    names = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.File and i.base_name.lower().endswith(IMAGE_SUFFIXES))
    if not names:
        raise DatasetError(f"{root}: no images ({'/'.join(IMAGE_SUFFIXES)}) and no metadata.jsonl/csv")
    return [{"sample_id": n, "source": name, "caption": prompt} for n, name in enumerate(names)]


def folder_rows(path: str, caption_column: str = "text", image_column: str = "file_name",
                prompt: str | None = None, id_offset: int = 0) -> tuple[pafs.FileSystem, str, list[dict]]:
    """The filesystem, root and checked rows {sample_id, source, caption} of a dataset folder.

    With `prompt`, every caption is that prompt and a folder without a metadata file is read as a
    plain list of images (DreamBooth instance/class folders). `id_offset` is added to sample ids, so
    rows of two datasets trained together never share noise keys.
    """
    fs, root = open_folder(path)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise DatasetError(f"{path}: not a directory")
    has_meta = any(i.type == pafs.FileType.File for i in fs.get_file_info([f"{root}/{m}" for m in METADATA_FILES]))
    if prompt is not None and not has_meta:
        rows = list_images(fs, root, prompt)
    else:
        meta, rows = read_metadata(fs, root, caption_column, image_column)
        rows = check_rows(fs, root, meta, rows)
        if prompt is not None:
            rows = [{**r, "caption": prompt} for r in rows]
    return fs, root, [{**r, "sample_id": r["sample_id"] + id_offset} for r in rows]


def check_concept_images(path: str, caption_column: str, image_column: str, prompt: str, min_images: int,
                         what: str) -> int:
    """Decode every image of a small concept folder (DreamBooth instances, Textual Inversion images) on
    the driver, before any Ray work; returns how many there are.

    Raises:
        DatasetError: one line naming `what`, the folder and up to five bad files, or too few images.
    """
    from diffray.data.transforms import decode_image

    try:
        fs, root, rows = folder_rows(path, caption_column, image_column, prompt=prompt)
    except DatasetError as exc:
        raise DatasetError(f"{what}: {exc}") from None
    bad = []
    for row in rows:
        try:
            with fs.open_input_stream(f"{root}/{row['source']}") as f:
                decode_image(f.read(), row["source"])
        except DatasetError as exc:
            bad.append(str(exc))
    if bad:
        valid = len(rows) - len(bad)
        raise DatasetError(f"{what} in {root}: {len(bad)} of {len(rows)} cannot be used"
                           f"{' (no valid images)' if valid == 0 else ''}: {'; '.join(bad[:5])}")
    if len(rows) < min_images:
        raise DatasetError(f"{what} in {root}: {len(rows)} found, train.micro_batch_size needs {min_images}")
    return len(rows)


def read_imagefolder(path: str, caption_column: str = "text", image_column: str = "file_name",
                     prompt: str | None = None, id_offset: int = 0) -> ray.data.Dataset:
    """Rows {sample_id int, image bytes, caption str, source str}; sample_id is the metadata row order.

    Raises:
        DatasetError: no metadata file, a missing column, or a referenced image that does not exist.
    """
    fs, root, rows = folder_rows(path, caption_column, image_column, prompt, id_offset)

    def load_bytes(batch: dict) -> dict:
        data = []
        for source in batch["source"]:
            with fs.open_input_stream(f"{root}/{source}") as f:
                data.append(f.read())
        batch["image"] = np.array(data, dtype=object)
        return batch

    return raise_original_errors(ray.data.from_items(rows).map_batches(load_bytes, batch_format="numpy"))


def raise_original_errors(ds: ray.data.Dataset) -> ray.data.Dataset:
    """Make an error raised in our map functions reach the consumer as `RayTaskError(<original type>)`.

    By default Ray Data wraps it in a `UserCodeException` and drops the original (its `__cause__` does
    not survive pickling), so `except DatasetError` would never match. This changes only this
    dataset's context, not the process-wide one; `.cause` of the raised error is the original.
    """
    ds.context.raise_original_map_exception = True
    return ds


@functools.lru_cache(maxsize=4)
def load_tokenizer(tokenizer_path: str):
    """The CLIP tokenizer of a model dir, loaded once per worker process (never shipped from the driver)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_path, subfolder="tokenizer")


def preprocess_batch(batch: dict, root: str, tokenizer_path: str, resolution: int, center_crop: bool,
                     random_flip: bool, seed: int) -> dict:
    """One map_batches step: raw rows -> {sample_id, pixel_values, input_ids}; errors name root/source."""
    ids = [int(i) for i in batch["sample_id"]]
    sources = [f"{root.rstrip('/')}/{s}" for s in batch["source"]]
    pixels = preprocess_images(list(batch["image"]), ids, sources, resolution, center_crop, random_flip, seed)
    input_ids = tokenize_captions(load_tokenizer(tokenizer_path), [str(c) for c in batch["caption"]])
    return {"sample_id": np.asarray(ids, dtype=np.int64), "pixel_values": pixels, "input_ids": input_ids}


def prepare_training_dataset(path: str, tokenizer_path: str, resolution: int, center_crop: bool, random_flip: bool,
                             seed: int, caption_column: str = "text", image_column: str = "file_name",
                             prompt: str | None = None, id_offset: int = 0) -> ray.data.Dataset:
    """Columns: sample_id int64, pixel_values float32 [3,R,R] in [-1,1], input_ids int64 [77].

    `tokenizer_path` is a model dir with a `tokenizer/` subfolder. Preprocessing runs as plain Ray tasks
    (no actor pool), so it never holds CPUs that training workers need.

    Raises:
        DatasetError: at once for a bad folder (see `read_imagefolder`); when the dataset is consumed
            for an undecodable image, as `RayTaskError(DatasetError)` naming the file.
    """
    ds = read_imagefolder(path, caption_column, image_column, prompt, id_offset)
    ds = ds.map_batches(preprocess_batch, batch_size=32, batch_format="numpy",
                        fn_kwargs={"root": path, "tokenizer_path": tokenizer_path, "resolution": resolution,
                                   "center_crop": center_crop, "random_flip": random_flip, "seed": seed})
    return raise_original_errors(ds)
