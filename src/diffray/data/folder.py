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
import logging
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.fs as pafs

from diffray import storage
from diffray.errors import DatasetError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
log = logging.getLogger(__name__)


def parse_metadata(name: str, text: str) -> list[tuple[int, dict | None, str]]:
    """(line number, record, error) triples from metadata.jsonl or metadata.csv text; blank lines skipped.

    A JSONL line that is not JSON, or not a JSON object, is kept as (n, None, why) so that validation
    quarantines that row alone. A CSV record's number is the line it starts on.

    Raises:
        DatasetError: a CSV file that is not valid CSV, or whose quoted field swallows following rows (a
            stray quote), naming `name` and the line where the record starts.
    """
    if name.endswith(".csv"):
        return _csv_records(name, text)
    records: list[tuple[int, dict | None, str]] = []
    # "\n" only: str.splitlines() also splits on U+2028, U+0085, \x1c... which JSON allows raw inside strings.
    for n, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip(" \t"):
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append((n, None, f"metadata line {n}: invalid JSON ({exc.msg})"))
            continue
        except RecursionError:  # json's decoder recurses once per [ or {
            records.append((n, None, f"metadata line {n}: JSON nested too deeply"))
            continue
        if isinstance(rec, dict):
            records.append((n, rec, ""))
        else:
            records.append((n, None, f"metadata line {n}: a JSON {type(rec).__name__}, not an object"))
    return records


def lone_surrogate(text: str) -> int:
    """Where `text` holds an unpaired UTF-16 surrogate (JSON allows the escape "\\ud83d" alone, e.g. from a
    JavaScript string cut inside an emoji; no file system and no tokenizer accepts it), else -1."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return -1


# A line inside a quoted field that starts like a row of its own ("name.png,"): the quote opened above it
# was never meant to span lines.
_ROW_START = re.compile(r"\n\s*[^,\"\n]+\.(?:png|jpe?g|webp|bmp)\s*,", re.IGNORECASE)
_UNCLOSED = "a stray quote? Close it, or write a quote inside a quoted field as \"\""


def _csv_records(name: str, text: str) -> list[tuple[int, dict | None, str]]:
    """`parse_metadata` for CSV: csv.DictReader's records (extra fields under None, missing ones None),
    numbered by the line each starts on; strict, so a quote never closed is an error, not one huge caption."""
    reader = csv.reader(io.StringIO(text), strict=True)
    header: list[str] | None = None
    records: list[tuple[int, dict | None, str]] = []
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return records
        except csv.Error as exc:
            why = "not valid CSV" if reader.line_num <= start else \
                f"a quote opened in this row is still open at line {reader.line_num}"
            raise DatasetError(f"{name}: line {start}: {why} ({exc}); {_UNCLOSED}") from None
        if row and header is None:
            header = row
        elif row:
            swallowed = next((m for m in map(_ROW_START.search, row) if m), None)
            if swallowed is not None:
                first = swallowed.string[swallowed.start() + 1:].split("\n")[0][:60]
                raise DatasetError(f"{name}: line {start}: a quoted field opened here runs to line {reader.line_num}"
                                   f" over lines that look like rows ({first!r}); {_UNCLOSED}")
            rec: dict = dict(zip(header, row))
            if len(row) > len(header):
                rec[None] = row[len(header):]
            rec.update((k, None) for k in header[len(row):])
            records.append((start, rec, ""))
        start = reader.line_num + 1


@dataclass(frozen=True)
class PathRules:
    """Where the file names of a dataset may point: inside its own folder, or inside one of `roots`
    (`data.image_roots`: absolute folders or URI prefixes, e.g. where an HF `datasets` Parquet file's
    absolute image paths live); `follow_symlinks` (`data.follow_symlinks`) lets local links leave them."""

    follow_symlinks: bool = False
    roots: tuple[str, ...] = ()

    @classmethod
    def of(cls, data) -> PathRules:
        return cls(data.follow_symlinks, tuple(data.image_roots))


LOCAL_ONLY = PathRules()


def member(fs: pafs.FileSystem, root: str, name, column: str, paths: PathRules = LOCAL_ONLY) -> tuple[str, str]:
    """(the path to open, "") when `name` names a file inside the dataset folder `root` (the path is then
    relative to it) or inside one of `paths.roots` (the path is then absolute), else ("", why not).

    Never opens the file. `..` that climbs out, absolute paths and URIs outside the allowed folders are
    refused; on a local disk so is a symlink that resolves outside them, unless `paths.follow_symlinks`.
    """
    if name is None:
        return "", ""  # no file: validation reports "image file not found"
    if not isinstance(name, str):
        return "", f"{column} is a JSON {type(name).__name__}, not a file name"
    if "\x00" in name:  # the OS refuses such a path outright (ValueError from every path call)
        return "", f"{column} {name[:200]!r} holds a NUL character, not a file name"
    if lone_surrogate(name) >= 0:  # every path call raises UnicodeEncodeError
        return "", f"{column} {name[:200]!r} holds an unpaired UTF-16 surrogate, not a file name"
    outside = f"{column} {name[:200]!r} is not a file inside the dataset folder"
    if storage.is_uri(name) or name.startswith("/"):
        base = next((r for r in paths.roots if _under(name, r)), None)
        if base is None:
            return "", outside + " (data.image_roots lists other folders image paths may name)"
        return _link_check(fs, base, name, name, column, paths)
    norm = posixpath.normpath(name.replace("\\", "/"))
    if not name or norm in (".", "..") or norm.startswith("../") or norm.startswith("/"):
        return "", outside
    return _link_check(fs, root, posixpath.join(root, norm), norm, column, paths)


def _under(path: str, base: str) -> bool:
    if storage.is_uri(path) or storage.is_uri(base):
        return path.startswith(base.rstrip("/") + "/") and "/../" not in path
    norm = posixpath.normpath(path)
    return norm.startswith(posixpath.normpath(base).rstrip("/") + "/")


def _link_check(fs: pafs.FileSystem, base: str, full: str, name: str, column: str,
                paths: PathRules) -> tuple[str, str]:
    if isinstance(fs, pafs.LocalFileSystem) and not paths.follow_symlinks and not storage.is_uri(full):
        real_base = os.path.realpath(base)
        if os.path.commonpath([real_base, os.path.realpath(full)]) != real_base:
            return "", (f"{column} {name[:200]!r} is a link to a file outside the dataset folder "
                        "(data.follow_symlinks: true allows links)")
    return (posixpath.normpath(full) if name.startswith("/") else name), ""


def open_path(root: str, source: str) -> str:
    """The path to open for a `member` result: absolute ones (allowed roots) as they are."""
    return source if source.startswith("/") or storage.is_uri(source) else f"{root}/{source}"


def read_metadata(fs: pafs.FileSystem, root: str, caption_column: str, image_column: str,
                  conditioning_column: str | None = None,
                  paths: PathRules = LOCAL_ONLY, mask_column: str | None = None) -> tuple[str, list[dict]]:
    """The metadata file and its rows {sample_id, source, caption, line, error[, conditioning_source]} in
    file order.

    A column absent from every row is a config mistake (DatasetError naming it and the columns there
    are); a value absent from some rows is left None for validation to quarantine, and a row that is
    not an object, has a value of the wrong JSON type or names a file outside the folder carries its
    `error` (validation quarantines it without opening anything).
    """
    infos = fs.get_file_info([f"{root}/{name}" for name in METADATA_FILES])
    meta = next((i.path for i in infos if i.type == pafs.FileType.File), None)
    if meta is None:
        raise DatasetError(f"{root}: no metadata.jsonl or metadata.csv (expected an imagefolder with "
                           f"{image_column}/{caption_column} columns)")
    with fs.open_input_stream(meta) as f:
        records = parse_metadata(meta, decode_text(meta, f.read()))
    if not records:
        raise DatasetError(f"{meta}: no rows")
    for col in (image_column, caption_column, conditioning_column, mask_column):
        if col is not None and not any(col in rec for _, rec, _ in records if rec):
            have = sorted({str(k) for _, rec, _ in records if rec for k in rec})
            raise DatasetError(f"{meta}: missing column {col!r} (has: {', '.join(have)})")
    columns = (caption_column, image_column, conditioning_column, mask_column)
    name = posixpath.basename(meta)
    rows = [_row(fs, root, k, n, rec, error, columns, paths, name) for k, (n, rec, error) in enumerate(records)]
    listed = [posixpath.relpath(i.path, root) for i in storage.list_files(fs, root, recursive=True)]
    _name_near_misses(fs, root, rows, listed, columns)
    named = {posixpath.normpath(rec[c]) for _, rec, _ in records if rec for c in columns[1:]
             if c and isinstance(rec.get(c), str)}
    top = [n for n in listed if "/" not in n and not n.startswith(".")]  # as `folder_files` lists them
    unnamed = [n for n in top if n.lower().endswith(IMAGE_SUFFIXES) and n not in named]
    if unnamed:  # a metadata file that lists only some of the images beside it trains on those only
        log.warning("%s: %d image file(s) beside it are in none of its rows, so not trained on: %s", meta,
                    len(unnamed), few(unnamed))
    return meta, rows


def _name_near_misses(fs: pafs.FileSystem, root: str, rows: list[dict], listed: list[str],
                      columns: tuple[str, str, str | None, str | None]) -> None:
    """Quarantine, saying what was probably meant, the rows naming a file the folder lacks when it has one of
    that name in another case (`Images/cat.png` for `images/cat.png`: one on macOS, two names on Linux); a row
    naming a file with no such near miss is left for validation ("image file not found")."""
    near, have = near_names(listed), set(listed)
    cols = [(k, c) for k, c in zip(("source", "conditioning_source", "mask_source"), columns[1:]) if c]
    guesses = [(r, c, r[k], near(r[k])) for r in rows if not r["error"] for k, c in cols
               if r[k] and r[k] not in have and not r[k].startswith("/") and not storage.is_uri(r[k])]
    guesses = [g for g in guesses if g[3]]
    infos = fs.get_file_info([open_path(root, g[2]) for g in guesses]) if guesses else []  # links, case-blind disks
    for (row, column, name, guess), info in zip(guesses, infos):
        if info.type == pafs.FileType.NotFound and not row["error"]:
            row["error"] = f"metadata line {row['line']}: {missing_with_guess(column, name, guess)}"


def near_names(files: list[str]) -> Callable[[str], str | None]:
    """A lookup from a relative file name to the listed file (`files`, relative to the same folder) it most
    likely means: the same path in another case. (Not the same name in another folder: datasets keep their
    masks and control images under the image's own name in folders of their own.)"""
    paths: dict[str, str] = {}
    for f in sorted(files):
        paths.setdefault(posixpath.normpath(f).lower(), f)
    return lambda name: paths.get(posixpath.normpath(name).lower())


def missing_with_guess(column: str, name: str, guess: str) -> str:
    """The one-line reason for a row whose file `name` is missing but `guess` (its name in another case) exists."""
    return f"{column} {name[:200]!r}: no such file; did you mean {guess!r}? names are case-sensitive"


def decode_text(name: str, data: bytes) -> str:
    """A metadata file's bytes as text: UTF-8, a leading byte-order mark (Excel's "CSV UTF-8") dropped.

    Raises:
        DatasetError: bytes that are not UTF-8 (a cp1252/Latin-1 export), naming the file, line and offset.
    """
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"{name}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line});"
                           " save it as UTF-8") from None


def _row(fs: pafs.FileSystem, root: str, sample_id: int, n: int, rec: dict | None, error: str,
         columns: tuple[str, str, str | None, str | None], paths: PathRules, meta_name: str) -> dict:
    """One metadata record as a row; a record that cannot be used carries its `error`, and its `source`
    names the metadata line instead of a file (nothing is opened for it)."""
    caption_column, image_column, conditioning_column, mask_column = columns
    rec = rec or {}
    caption = rec.get(caption_column)
    if caption is not None and not isinstance(caption, str):
        error = error or f"metadata line {n}: {caption_column} is a JSON {type(caption).__name__}, not text"
    elif caption is not None and (at := lone_surrogate(caption)) >= 0:
        error = error or (f"metadata line {n}: {caption_column} holds an unpaired UTF-16 surrogate "
                          f"({caption[at]!r} at character {at}: a string cut inside an emoji?), not text")
        caption = None
    row = {"sample_id": sample_id, "caption": caption if isinstance(caption, str) else None, "line": n}
    for key, col in (("source", image_column), ("conditioning_source", conditioning_column),
                     ("mask_source", mask_column)):
        if col is None:
            continue
        # A record without the column names no file: its line is quarantined (member() takes a missing
        # name as "no file", which would leave nothing that points back at the line).
        row[key], why = member(fs, root, rec.get(col), col, paths) if rec.get(col) is not None else ("", f"no {col}")
        error = error or (f"metadata line {n}: {why}" if why else "")
    row["error"] = error
    if error:
        row.update({k: "" for k in ("conditioning_source", "mask_source") if k in row}, source=f"{meta_name}:{n}")
    return row


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def folder_files(fs: pafs.FileSystem, root: str) -> list[str]:
    """The names of the files at the top of the folder, in name order, hidden ones (`.name`) left out."""
    return [i.base_name for i in storage.list_files(fs, root) if not i.base_name.startswith(".")]


def few(names: list[str], most: int = 5) -> str:
    """The first `most` names, and how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def has_metadata(fs: pafs.FileSystem, root: str) -> bool:
    """True when the folder holds metadata.jsonl or metadata.csv."""
    return any(i.type == pafs.FileType.File for i in fs.get_file_info([f"{root}/{m}" for m in METADATA_FILES]))


def list_images(fs: pafs.FileSystem, root: str, prompt: str, paths: PathRules = LOCAL_ONLY) -> list[dict]:
    """Rows for a plain folder of images (no metadata file), every caption `prompt`, in name order. Hidden
    files (`.DS_Store`, macOS's `._name.png` resource forks) are skipped, as by HF datasets; other files are
    named in a warning."""
    files = folder_files(fs, root)
    names = [n for n in files if n.lower().endswith(IMAGE_SUFFIXES)]
    if others := [n for n in files if not n.lower().endswith(IMAGE_SUFFIXES)]:
        log.warning("%s: %d file(s) not read, not %s: %s", root, len(others), "/".join(IMAGE_SUFFIXES), few(others))
    if not names:
        raise DatasetError(f"{root}: no images ({'/'.join(IMAGE_SUFFIXES)}) and no metadata.jsonl/csv")
    rows = []
    for n, name in enumerate(names):
        source, error = member(fs, root, name, "file", paths)
        rows.append({"sample_id": n, "source": source, "caption": prompt, "error": error})
    return rows


def folder_rows(path: str, caption_column: str = "text", image_column: str = "file_name",
                prompt: str | None = None, id_offset: int = 0,
                conditioning_column: str | None = None,
                paths: PathRules = LOCAL_ONLY,
                mask_column: str | None = None) -> tuple[pafs.FileSystem, str, list[dict]]:
    """The filesystem, root and rows {sample_id, source, caption, error[, conditioning_source]} of a
    folder (`error`: why the row cannot be used before reading anything, else "").

    With `prompt`, every caption is that prompt and a folder without a metadata file is read as a
    plain list of images (DreamBooth instance/class folders; such rows have no `mask_source`: every pixel
    trains). `id_offset` is added to sample ids, so
    rows of two datasets trained together never share noise keys.
    """
    fs, root = storage.resolve(path)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise DatasetError(f"{path}: not a directory")
    if prompt is not None and not has_metadata(fs, root):
        rows = list_images(fs, root, prompt, paths)
    else:
        _, rows = read_metadata(fs, root, caption_column, image_column, conditioning_column, paths, mask_column)
        # Missing image files are not an error here: the reader yields no bytes for them and
        # validation quarantines the row.
        rows = [{k: v for k, v in r.items() if k != "line"} for r in rows]
        if prompt is not None:
            rows = [{**r, "caption": prompt} for r in rows]
    return fs, root, [{**r, "sample_id": r["sample_id"] + id_offset} for r in rows]


def check_concept_images(path: str, caption_column: str, image_column: str, prompt: str | None, min_images: int,
                         what: str, paths: PathRules = LOCAL_ONLY,
                         caption_check: Callable[[str], str | None] | None = None) -> int:
    """Decode every image of a small concept folder (DreamBooth instances, Textual Inversion images) on
    the driver, before any Ray work; returns how many there are. `prompt` replaces every caption (None:
    the metadata's captions, each passed to `caption_check`, which returns why it is unusable or None).

    Raises:
        DatasetError: one line naming `what`, the folder and up to five bad files, or too few images.
    """
    from diffray.data.transforms import decode_image

    try:
        fs, root, rows = folder_rows(path, caption_column, image_column, prompt=prompt,
                                     paths=paths)
    except DatasetError as exc:
        raise DatasetError(f"{what}: {exc}") from None
    bad = []
    for row in rows:
        data = None if row["error"] else storage.read_or_none(fs, open_path(root, row["source"]))
        try:
            if row["error"]:
                raise DatasetError(row["error"])
            if data is None:
                raise DatasetError(f"{row['source']}: image file not found")
            decode_image(data, row["source"])
            why = None if caption_check is None else caption_check(row["caption"] or "")
            if why:
                raise DatasetError(f"{row['source']}: {why}")
        except DatasetError as exc:
            bad.append(str(exc))
    if bad:
        valid = len(rows) - len(bad)
        raise DatasetError(f"{what} in {root}: {len(bad)} of {len(rows)} cannot be used"
                           f"{' (no valid images)' if valid == 0 else ''}: {'; '.join(bad[:5])}")
    if len(rows) < min_images:
        raise DatasetError(f"{what} in {root}: {len(rows)} found, train.micro_batch_size needs {min_images}")
    return len(rows)


