"""Read Parquet datasets of image bytes + captions (the layout HF `datasets` `to_parquet` and
LAION-style shards use) into the same raw rows as the imagefolder reader; preference pairs (Pick-a-Pic's
columns: caption, jpg_0, jpg_1, label_0[, label_1]) into rows of the preferred image and its `pair_image`.

The driver lists the files and reads only their footers (row counts per row group), so every row
gets a stable `sample_id` (file order, then row order) before any data is read; each Ray task then
reads one row group. The image column may hold raw bytes, an HF `Image` struct {bytes, path}, or a
path string (relative to the Parquet file's folder).
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data

from diffray import storage
from diffray.data.folder import LOCAL_ONLY, PathRules, member, missing_with_guess, near_names, open_path
from diffray.data.raydata import raise_original_errors, raw_block
from diffray.errors import DatasetError

HF_IMAGE_COLUMN = "image"
log = logging.getLogger(__name__)


def parquet_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """A .parquet file, or every .parquet file under a folder (recursive, sorted)."""
    fs, root = storage.resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return fs, [root]
    if info.type != pafs.FileType.Directory:
        raise DatasetError(f"{path}: not found")
    files = [i.path for i in storage.list_files(fs, root, recursive=True) if i.path.endswith(".parquet")]
    if not files:
        raise DatasetError(f"{path}: no .parquet files")
    return fs, files


def is_parquet(path: str) -> bool:
    """True for a .parquet file or a folder holding .parquet files and no imagefolder metadata."""
    from diffray.data.folder import has_metadata

    fs, root = storage.resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return root.endswith(".parquet")
    if info.type != pafs.FileType.Directory or has_metadata(fs, root):
        return False
    return any(i.path.endswith(".parquet") for i in storage.list_files(fs, root, recursive=True))


def resolve_columns(schema: pa.Schema, file: str, caption_column: str, image_column: str,
                    conditioning_column: str | None) -> tuple[str, str, str | None]:
    """The image, caption and conditioning column names in this schema. The default `file_name` reads HF's
    'image' column where the file has one (an HF `datasets` file may carry both: its images and their original
    names), else a column of paths under that name; another name falls back to 'image' too."""
    names = set(schema.names)
    if image_column == "file_name" and HF_IMAGE_COLUMN in names:
        image = HF_IMAGE_COLUMN
    else:
        image = image_column if image_column in names else (HF_IMAGE_COLUMN if HF_IMAGE_COLUMN in names else None)
    for want, got in ((image_column, image), (caption_column, caption_column if caption_column in names else None),
                      (conditioning_column, conditioning_column if conditioning_column in names else None)):
        if want is not None and got is None:
            also = f" or {HF_IMAGE_COLUMN!r}" if want == image_column != HF_IMAGE_COLUMN else ""
            raise DatasetError(f"{file}: missing column {want!r}{also} (has: {', '.join(schema.names)})")
    return image, caption_column, conditioning_column


def check_caption_type(schema: pa.Schema, file: str, column: str) -> None:
    """DatasetError unless `column` holds text: string or binary (UTF-8 bytes), possibly dictionary-encoded,
    or only nulls. A float or list column would otherwise train on "nan" or "['a', 'red']"."""
    kind = schema.field(column).type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_binary,
            pa.types.is_large_binary, pa.types.is_binary_view, pa.types.is_null)
    if not any(is_text(value) for is_text in text):
        raise DatasetError(f"{file}: caption column {column!r} holds {kind}, not text (string or UTF-8 binary)")


def check_image_type(schema: pa.Schema, file: str, column: str, what: str = "image") -> None:
    """DatasetError unless `column` can hold images: bytes, an HF `Image` struct {bytes, path}, file path strings
    (possibly dictionary-encoded), or only nulls. Another column (a width, a label, a list) would otherwise
    quarantine every row as "image file not found"."""
    kind = schema.field(column).type
    value = kind.value_type if pa.types.is_dictionary(kind) else kind
    flat = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view, pa.types.is_fixed_size_binary,
            pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_null)
    hf_image = pa.types.is_struct(value) and any(value.get_field_index(f) >= 0 for f in ("bytes", "path"))
    if not (hf_image or any(is_image(value) for is_image in flat)):
        raise DatasetError(f"{file}: {what} column {column!r} holds {kind}, not images (bytes, an HF Image struct "
                           "{bytes, path} or file paths)")


def caption_cell(value, column: str) -> tuple[str | None, str]:
    """(caption, "") of one caption cell, or (None, why it cannot be used). None and NaN are a missing
    caption (data.default_caption applies); bytes must be UTF-8."""
    if value is None or (isinstance(value, float) and value != value):
        return None, ""
    if isinstance(value, str):
        return value, ""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8"), ""
        except UnicodeDecodeError as exc:
            return None, f"{column} is not UTF-8 text (byte 0x{value[exc.start]:02x} at offset {exc.start})"
    return None, f"{column} is a {type(value).__name__}, not text"


@dataclass(frozen=True)
class PairColumns:
    """Where a preference pair's second image and its labels are (method diffusion_dpo): `image` is the
    pair's first image, `image_label` its label, `pair` the second image and `pair_label` the second's
    label (used when the file has it). A row prefers the image with the larger label; equal labels (a tie,
    or "both bad": 0/0) carry no preference and the row is skipped. With `image_label` alone, > 0.5 prefers
    the first image, < 0.5 the second (Pick-a-Pic's label_0)."""

    pair: str = "jpg_1"
    image_label: str = "label_0"
    pair_label: str = "label_1"


def preference(first, second) -> int | None:
    """0: the first image is preferred, 1: the second, None: no preference (a tie, both bad, a missing
    label). `second` is None when the file has no second label column."""
    if first is None or first != first:  # None or NaN
        return None
    if second is None:
        second = 1.0 - float(first)
    if second != second or float(first) == float(second):
        return None
    return 0 if float(first) > float(second) else 1


def row_groups(fs: pafs.FileSystem, files: list[str], caption_column: str, image_column: str,
               conditioning_column: str | None, mask_column: str | None = None,
               pairs: PairColumns | None = None) -> list[dict]:
    """One work item per row group {file, row_group, first_id, num_rows, columns}, ids in file order."""
    items, next_id = [], 0
    for file in files:
        try:
            with fs.open_input_file(file) as f:
                meta = pq.ParquetFile(f).metadata
                schema = meta.schema.to_arrow_schema()
        except (OSError, pa.ArrowException) as exc:
            raise DatasetError(f"{file}: not a readable Parquet file ({exc})") from None
        image, caption, cond = resolve_columns(schema, file, caption_column, image_column, conditioning_column)
        check_caption_type(schema, file, caption)
        if mask_column is not None and mask_column not in schema.names:
            raise DatasetError(f"{file}: missing column {mask_column!r} (has: {', '.join(schema.names)})")
        for what, col in (("image", image), ("conditioning image", cond), ("mask", mask_column)):
            if col is not None:
                check_image_type(schema, file, col, what)
        pair = pair_label = label = ""
        if pairs is not None:
            for col in (pairs.pair, pairs.image_label):
                if col not in schema.names:
                    raise DatasetError(f"{file}: missing column {col!r} of the preference pairs "
                                       f"(has: {', '.join(schema.names)})")
            pair, label = pairs.pair, pairs.image_label
            check_image_type(schema, file, pair, "pair image")
            pair_label = pairs.pair_label if pairs.pair_label in schema.names else ""
        first_row = 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            items.append({"file": file, "row_group": g, "first_id": next_id, "first_row": first_row, "num_rows": n,
                          "image": image, "caption": caption, "conditioning": cond or "", "mask": mask_column or "",
                          "pair": pair, "label": label, "pair_label": pair_label})
            next_id, first_row = next_id + n, first_row + n
    if next_id == 0:
        raise DatasetError(f"{files[0] if len(files) == 1 else posixpath.dirname(files[0])}: no rows")
    return items


def image_bytes(fs: pafs.FileSystem, value, folder: str, column: str,
                paths: PathRules = LOCAL_ONLY, near=None) -> tuple[bytes | None, str]:
    """(bytes, "") of one image cell: raw bytes, an HF Image struct {bytes, path}, or a path string; a
    path must name a file inside the Parquet file's folder (else (None, why), the file never opened). A path
    no file has gives (None, "") for validation to report, or (None, why) naming the file `near(path)` (a
    `near_names` lookup) finds in another case or folder."""
    if value is None:
        return None, ""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"], ""
        value = value.get("path")
        if not value:
            return None, ""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), ""
    name, error = member(fs, folder, str(value), column, paths)
    if error:
        return None, error
    data = storage.read_or_none(fs, open_path(folder, name))
    relative = not name.startswith("/") and not storage.is_uri(name)
    guess = near(name) if data is None and near is not None and relative else None
    return data, missing_with_guess(column, name, guess) if guess and guess != name else ""


def lazy_near_names(fs: pafs.FileSystem, folder: str):
    """`near_names` of the files under `folder`, listed at the first lookup (a row group's first missing
    file), so a row group lists its folder once at most, and one whose files are all there never."""
    found: list = []

    def near(name: str) -> str | None:
        if not found:
            try:
                listed = [posixpath.relpath(i.path, folder) for i in storage.list_files(fs, folder, recursive=True)]
            except (OSError, pa.ArrowException):
                listed = []
            found.append(near_names(listed))
        return found[0](name)

    return near


def read_row_group(fs: pafs.FileSystem, file: str, group: int, columns: list[str]) -> pa.Table:
    """One row group. A file whose footer reads but whose pages do not (corrupt bytes) is a DatasetError
    naming the file and the row group, not a pyarrow traceback from inside a Ray task."""
    try:
        with fs.open_input_file(file) as f:
            return pq.ParquetFile(f).read_row_group(group, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"{file}: row group {group} is not readable Parquet ({str(exc)[:200]})") from None


def read_parquet_rows(path: str, caption_column: str = "text", image_column: str = "image",
                      conditioning_column: str | None = None, id_offset: int = 0,
                      paths: PathRules = LOCAL_ONLY, mask_column: str | None = None,
                      pairs: PairColumns | None = None) -> tuple[ray.data.Dataset, int]:
    """Rows {sample_id, source ("file#row"), caption, error, image bytes|None[, conditioning_image, mask_image,
    pair_image]}, and how many. `error` says why a row cannot be used before decoding (an image path outside
    the folder). With `pairs`, `image` is the preferred image of each pair and `pair_image` the other one;
    pairs without a preference are left out (and out of the count).

    Raises:
        DatasetError: no Parquet files, an unreadable footer, or a missing column (named with the
            columns the file has).
    """
    fs, files = parquet_files(path)
    items = row_groups(fs, files, caption_column, image_column, conditioning_column, mask_column, pairs)
    # raw column -> the item key holding its name
    extra = {"conditioning_image": "conditioning", "mask_image": "mask", "pair_image": "pair"}

    def read_group(batch: dict):
        out: dict[str, list] = {"sample_id": [], "source": [], "caption": [], "image": [], "error": []}
        for i, item in enumerate(batch["file"]):
            it = {k: batch[k][i] for k in batch}
            names = {col: str(it[key]) for col, key in extra.items() if it[key]}
            for col in names:  # the column exists even for a row group of no rows
                out.setdefault(col, [])
            labels = [str(it[k]) for k in ("label", "pair_label") if it.get(k)]
            table = read_row_group(fs, str(it["file"]), int(it["row_group"]),
                                   [it["image"], it["caption"], *names.values(), *labels])
            table_rows(fs, table, it, names, out, id_offset, paths)
        return raw_block(out)

    ds = ray.data.from_items(items).map_batches(read_group, batch_size=1, batch_format="numpy")
    total = sum(it["num_rows"] for it in items)
    if pairs is not None:
        total = count_preferences(fs, items, total, path)
    return raise_original_errors(ds), total


def table_rows(fs: pafs.FileSystem, table: pa.Table, it: dict, names: dict[str, str], out: dict[str, list],
               id_offset: int = 0, paths: PathRules = LOCAL_ONLY) -> None:
    """Append the rows of one row group `table` (work item `it` of `row_groups`) to the columns `out`;
    `names` maps the extra raw columns (conditioning_image, ...) to theirs in the file."""
    folder = posixpath.dirname(str(it["file"]))
    images, captions = table.column(it["image"]).to_pylist(), table.column(it["caption"]).to_pylist()
    others = {col: table.column(name).to_pylist() for col, name in names.items()}
    prefs = row_preferences(table, it)
    near = lazy_near_names(fs, folder)
    for i in range(table.num_rows):
        if prefs is not None:
            if prefs[i] is None:
                continue
            if prefs[i] == 1:  # the second image won: it becomes the row's image
                images[i], others["pair_image"][i] = others["pair_image"][i], images[i]
        out["sample_id"].append(int(it["first_id"]) + i + id_offset)
        out["source"].append(f"{it['file']}#{int(it['first_row']) + i}")
        caption, error = caption_cell(captions[i], str(it["caption"]))
        out["caption"].append(caption)
        img, why = image_bytes(fs, images[i], folder, it["image"], paths, near)
        out["image"].append(img)
        error = error or why
        for col, values in others.items():  # conditioning and mask images: same rules as the image
            data, why = image_bytes(fs, values[i], folder, names[col], paths, near)
            out.setdefault(col, []).append(data)
            error = error or why
        out["error"].append(error)


def row_preferences(table: pa.Table, item: dict) -> list[int | None] | None:
    """`preference` of every row of a row group read with pair columns; None without them."""
    if not item.get("label"):
        return None
    first = table.column(str(item["label"])).to_pylist()
    second = table.column(str(item["pair_label"])).to_pylist() if item.get("pair_label") else [None] * len(first)
    return [preference(a, b) for a, b in zip(first, second)]


def count_preferences(fs: pafs.FileSystem, items: list[dict], total: int, path: str) -> int:
    """How many rows carry a preference (the driver reads only the label columns); DatasetError when none."""
    kept = 0
    for it in items:
        labels = [str(it[k]) for k in ("label", "pair_label") if it.get(k)]
        kept += sum(p is not None for p in row_preferences(read_row_group(fs, str(it["file"]), int(it["row_group"]),
                                                                          labels), it))
    if kept == 0:
        raise DatasetError(f"{path}: none of the {total} pairs prefers one image (every pair is a tie or both bad)")
    if kept < total:
        log.info("data %s: %d of %d pairs carry no preference (ties, both bad) and are skipped", path,
                 total - kept, total)
    return kept
