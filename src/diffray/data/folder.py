"""The imagefolder layout (HF style): `metadata.jsonl` or `metadata.csv` beside the image files, or for
concept folders (DreamBooth, Textual Inversion) a plain folder of images. Parses and checks metadata on
the driver, so a bad folder fails with a `DatasetError` naming the file before any Ray work.

The folder may be a local path or any pyarrow filesystem URI (through `diffray.storage`). Never imports
Ray: `diffray.data.imagefolder` turns these rows into a Ray Dataset.
"""

from __future__ import annotations

import csv
import io
import json

import pyarrow.fs as pafs

from diffray import storage
from diffray.errors import DatasetError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


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


def read_metadata(fs: pafs.FileSystem, root: str, caption_column: str, image_column: str,
                  conditioning_column: str | None = None) -> tuple[str, list[dict]]:
    """The metadata file and its rows {sample_id, source, caption, line[, conditioning_source]} in file order.

    A column absent from every row is a config mistake (DatasetError naming it and the columns there
    are); a value absent from some rows is left None for validation to quarantine.
    """
    infos = fs.get_file_info([f"{root}/{name}" for name in METADATA_FILES])
    meta = next((i.path for i in infos if i.type == pafs.FileType.File), None)
    if meta is None:
        raise DatasetError(f"{root}: no metadata.jsonl or metadata.csv (expected an imagefolder with "
                           f"{image_column}/{caption_column} columns)")
    with fs.open_input_stream(meta) as f:
        records = parse_metadata(meta, f.read().decode("utf-8"))
    if not records:
        raise DatasetError(f"{meta}: no rows")
    for col in (image_column, caption_column, conditioning_column):
        if col is not None and not any(col in rec for _, rec in records):
            have = sorted({str(k) for _, rec in records for k in rec})
            raise DatasetError(f"{meta}: missing column {col!r} (has: {', '.join(have)})")
    rows = []
    for n, rec in records:
        caption = rec.get(caption_column)
        row = {"sample_id": len(rows), "source": str(rec.get(image_column) or ""),
               "caption": None if caption is None else str(caption), "line": n}
        if conditioning_column is not None:
            row["conditioning_source"] = str(rec.get(conditioning_column) or "")
        rows.append(row)
    return meta, rows


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def has_metadata(fs: pafs.FileSystem, root: str) -> bool:
    """True when the folder holds metadata.jsonl or metadata.csv."""
    return any(i.type == pafs.FileType.File for i in fs.get_file_info([f"{root}/{m}" for m in METADATA_FILES]))


def list_images(fs: pafs.FileSystem, root: str, prompt: str) -> list[dict]:
    """Rows for a plain folder of images (no metadata file), every caption `prompt`, in name order."""
    names = [i.base_name for i in storage.list_files(fs, root) if i.base_name.lower().endswith(IMAGE_SUFFIXES)]
    if not names:
        raise DatasetError(f"{root}: no images ({'/'.join(IMAGE_SUFFIXES)}) and no metadata.jsonl/csv")
    return [{"sample_id": n, "source": name, "caption": prompt} for n, name in enumerate(names)]


def folder_rows(path: str, caption_column: str = "text", image_column: str = "file_name",
                prompt: str | None = None, id_offset: int = 0,
                conditioning_column: str | None = None) -> tuple[pafs.FileSystem, str, list[dict]]:
    """The filesystem, root and rows {sample_id, source, caption[, conditioning_source]} of a folder.

    With `prompt`, every caption is that prompt and a folder without a metadata file is read as a
    plain list of images (DreamBooth instance/class folders). `id_offset` is added to sample ids, so
    rows of two datasets trained together never share noise keys.
    """
    fs, root = storage.resolve(path)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise DatasetError(f"{path}: not a directory")
    if prompt is not None and not has_metadata(fs, root):
        rows = list_images(fs, root, prompt)
    else:
        _, rows = read_metadata(fs, root, caption_column, image_column, conditioning_column)
        # Missing image files are not an error here: the reader yields no bytes for them and
        # validation quarantines the row.
        rows = [{k: v for k, v in r.items() if k != "line"} for r in rows]
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
        data = storage.read_or_none(fs, f"{root}/{row['source']}")
        try:
            if data is None:
                raise DatasetError(f"{row['source']}: image file not found")
            decode_image(data, row["source"])
        except DatasetError as exc:
            bad.append(str(exc))
    if bad:
        valid = len(rows) - len(bad)
        raise DatasetError(f"{what} in {root}: {len(bad)} of {len(rows)} cannot be used"
                           f"{' (no valid images)' if valid == 0 else ''}: {'; '.join(bad[:5])}")
    if len(rows) < min_images:
        raise DatasetError(f"{what} in {root}: {len(rows)} found, train.micro_batch_size needs {min_images}")
    return len(rows)


