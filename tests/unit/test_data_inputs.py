"""Metadata and Parquet inputs as real tools write them: stray quotes, Unicode line separators inside JSON
strings, byte-order marks and non-UTF-8 exports, captions of other Arrow types, a Parquet file of paths."""

from __future__ import annotations

import csv
import io
import json
import re

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from diffray.data.folder import folder_rows
from diffray.data.parquet import caption_cell, parquet_files, read_row_group, row_groups, table_rows
from diffray.data.validate import Rules, caption_of
from diffray.errors import DatasetError

PNG = b"\x89PNG\r\n\x1a\n not really"


def _folder(tmp_path, name: str, data: bytes | str, images: int = 5):
    for i in range(images):
        (tmp_path / f"{i}.png").write_bytes(PNG)
    (tmp_path / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return tmp_path


def _csv(rows: int, stray: str | None = None, closing: str | None = None) -> str:
    lines = ["file_name,text"] + [f"{i}.png,a red circle on a blue background number {i}" for i in range(rows)]
    if stray:
        lines[2] = stray
    if closing:
        lines[4] = closing
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ CSV

def test_a_stray_quote_in_metadata_csv_is_an_error_naming_the_file_and_its_line(tmp_path):
    _folder(tmp_path, "metadata.csv", _csv(5, stray='1.png,"quoted start but never closed'))
    meta = re.escape(str(tmp_path / "metadata.csv"))
    with pytest.raises(DatasetError, match=rf"^{meta}: line 3: a quote opened in this row is still open at line 6"):
        folder_rows(str(tmp_path))


def test_a_stray_quote_in_a_big_csv_is_not_a_field_limit_crash(tmp_path):
    _folder(tmp_path, "metadata.csv", _csv(3000, stray='1.png,"quoted start'), images=3)
    with pytest.raises(DatasetError, match=r"metadata\.csv: line 3: a quote opened .*field larger than field limit"):
        folder_rows(str(tmp_path))


def test_a_stray_quote_closed_rows_later_is_caught_by_the_rows_it_swallows(tmp_path):
    # csv reads this as valid: row 3's caption would be "starts\n2.png,...\n3.png,ends" and rows 4-5 vanish
    _folder(tmp_path, "metadata.csv", _csv(5, stray='1.png,"starts', closing='3.png,ends"'))
    with pytest.raises(DatasetError, match=r"metadata\.csv: line 3: a quoted field opened here runs to line 5 over "
                                           r"lines that look like rows \('2\.png,a red"):
        folder_rows(str(tmp_path))


def test_text_after_a_closing_quote_is_an_error_naming_its_line(tmp_path):
    _folder(tmp_path, "metadata.csv", 'file_name,text\n0.png,fine\n1.png,"a" b\n')
    with pytest.raises(DatasetError, match=r"metadata\.csv: line 3: not valid CSV \(',' expected after '\"'\)"):
        folder_rows(str(tmp_path))


def test_quoted_commas_quotes_and_newlines_in_csv_captions_still_read(tmp_path):
    captions = ["a red, round circle", 'a "quoted" word', "two\nlines, with a comma", "plain", "ok"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")  # as Excel and pandas write it
    writer.writerow(["file_name", "text"])
    writer.writerows([f"{i}.png", c] for i, c in enumerate(captions[:4]))
    writer.writerow(["../out.png", captions[4]])  # a bad row after the multi-line caption: its own line
    _folder(tmp_path, "metadata.csv", out.getvalue(), images=4)
    rows = folder_rows(str(tmp_path))[2]
    assert [r["caption"] for r in rows] == captions
    assert [r["source"] for r in rows] == ["0.png", "1.png", "2.png", "3.png", "metadata.csv:7"]
    assert "line 7: file_name '../out.png' is not a file inside" in rows[4]["error"]


# ------------------------------------------------------------------------------------------------ JSONL

def test_jsonl_captions_may_hold_unicode_line_separators(tmp_path):
    captions = ["first line\u2028second", "ellipsis\x85 in cp1252 mojibake", "page\x0cbreak\x1cfile sep", "\u2029"]
    lines = [json.dumps({"file_name": f"{i}.png", "text": c}, ensure_ascii=False) for i, c in enumerate(captions)]
    lines.append(json.dumps({"file_name": "../out.png", "text": "after them"}))
    _folder(tmp_path, "metadata.jsonl", "\r\n".join(lines) + "\r\n", images=4)  # CRLF still reads
    rows = folder_rows(str(tmp_path))[2]
    assert [r["caption"] for r in rows] == [*captions, "after them"]
    assert [r["error"] for r in rows[:4]] == [""] * 4
    assert rows[4]["source"] == "metadata.jsonl:5" and "metadata line 5:" in rows[4]["error"]


# ------------------------------------------------------------------------------------------------ encodings

@pytest.mark.parametrize("name, text", [
    ("metadata.csv", "file_name,text\n0.png,a red circle\n"),
    ("metadata.jsonl", '{"file_name": "0.png", "text": "a red circle"}\n'),
])
def test_metadata_with_a_utf8_byte_order_mark_reads(tmp_path, name, text):
    _folder(tmp_path, name, "\ufeff".encode() + text.encode(), images=1)  # Excel's "CSV UTF-8"
    rows = folder_rows(str(tmp_path))[2]
    assert [(r["source"], r["caption"], r["error"]) for r in rows] == [("0.png", "a red circle", "")]


@pytest.mark.parametrize("name, text", [
    ("metadata.csv", "file_name,text\n0.png,un café crème\n"),
    ("metadata.jsonl", '{"file_name": "0.png", "text": "x"}\n{"file_name": "1.png", "text": "café"}\n'),
])
def test_metadata_that_is_not_utf8_names_the_file_the_line_and_the_offset(tmp_path, name, text):
    data = text.encode("cp1252")
    _folder(tmp_path, name, data, images=2)
    at = data.index(b"\xe9")
    meta = re.escape(str(tmp_path / name))
    with pytest.raises(DatasetError, match=rf"^{meta}: not UTF-8 text \(byte 0xe9 at offset {at}, line 2\); "
                                           "save it as UTF-8$"):
        folder_rows(str(tmp_path))


# ------------------------------------------------------------------------------------------------ Parquet

def _parquet(tmp_path, table: pa.Table) -> tuple[pafs.FileSystem, list[str]]:
    pq.write_table(table, tmp_path / "data.parquet")
    return parquet_files(str(tmp_path / "data.parquet"))


def _rows(fs, files, caption_column: str = "text", image_column: str = "image") -> dict[str, list]:
    out: dict[str, list] = {"sample_id": [], "source": [], "caption": [], "image": [], "error": []}
    for it in row_groups(fs, files, caption_column, image_column, None):
        table_rows(fs, read_row_group(fs, it["file"], it["row_group"], [it["image"], it["caption"]]), it, {}, out)
    return out


@pytest.mark.parametrize("captions, kind", [
    (pa.array([float("nan"), 1.5]), "double"),
    (pa.array([["a", "red"], ["b"]]), "list<"),
    (pa.array([1, 2]), "int64"),
])
def test_a_parquet_caption_column_that_is_not_text_is_an_error_naming_it_and_its_type(tmp_path, captions, kind):
    fs, files = _parquet(tmp_path, pa.table({"image": [PNG, PNG], "text": captions}))
    with pytest.raises(DatasetError, match=rf"data\.parquet: caption column 'text' holds {re.escape(kind)}.*, not "):
        row_groups(fs, files, "text", "image", None)


@pytest.mark.parametrize("images, kind", [
    (pa.array([512, 768]), "int64"),  # data.image_column=width of a LAION-style shard
    (pa.array([0.5, 1.0]), "double"),
    (pa.array([[PNG], [PNG]]), "list<"),
    (pa.array([{"data": PNG}, {"data": PNG}]), "struct<data: binary>"),
])
def test_a_parquet_image_column_that_cannot_hold_images_is_an_error_naming_it_and_its_type(tmp_path, images, kind):
    # Read as paths, every row would be quarantined as "image file not found".
    fs, files = _parquet(tmp_path, pa.table({"image": images, "text": ["a", "b"]}))
    with pytest.raises(DatasetError, match=rf"data\.parquet: image column 'image' holds {re.escape(kind)}.*, not im"):
        row_groups(fs, files, "text", "image", None)


@pytest.mark.parametrize("images", [
    pa.array([PNG, None]), pa.array([PNG, None], pa.large_binary()), pa.array([PNG, PNG]).dictionary_encode(),
    pa.array([{"bytes": PNG, "path": None}, {"bytes": None, "path": None}]), pa.array([None, None]),
])
def test_parquet_image_columns_of_bytes_hf_structs_or_nulls_still_read(tmp_path, images):
    fs, files = _parquet(tmp_path, pa.table({"image": images, "text": ["a", "b"]}))
    assert _rows(fs, files)["image"] == [None if v is None else PNG for v in _cells(images)]


def _cells(images: pa.Array) -> list:
    return [v.get("bytes") if isinstance(v, dict) else v for v in images.to_pylist()]


@pytest.mark.parametrize("captions", [
    pa.array([b"a red square", b"\xff\xfe bad", None], pa.binary()),
    pa.array([b"a red square", b"\xff\xfe bad", None], pa.large_binary()),
])
def test_binary_parquet_captions_decode_and_a_non_utf8_cell_is_quarantined(tmp_path, captions):
    fs, files = _parquet(tmp_path, pa.table({"image": [PNG] * 3, "text": captions}))
    out = _rows(fs, files)
    assert out["caption"] == ["a red square", None, None]
    assert out["error"] == ["", "text is not UTF-8 text (byte 0xff at offset 0)", ""]


def test_string_parquet_captions_read_as_they_are_and_null_is_a_missing_caption(tmp_path):
    text = pa.array(["a red, round circle", None, ""]).dictionary_encode()
    fs, files = _parquet(tmp_path, pa.table({"image": [PNG] * 3, "text": text}))
    out = _rows(fs, files)
    assert out["caption"] == ["a red, round circle", None, ""] and out["error"] == ["", "", ""]
    assert caption_of(out["caption"][1], Rules(default_caption="a photo")) == "a photo"


def test_caption_cells_of_other_types_are_missing_or_a_reason_naming_the_type():
    assert caption_cell(None, "text") == caption_cell(float("nan"), "text") == (None, "")
    assert caption_cell(b"caf\xc3\xa9", "text") == ("café", "")
    assert caption_cell(["a", "red"], "text") == (None, "text is a list, not text")
    assert caption_cell(1.5, "caption") == (None, "caption is a float, not text")


def test_a_parquet_file_of_file_name_paths_reads_them(tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "b.png").write_bytes(PNG + b"b")
    fs, files = _parquet(tmp_path, pa.table({"file_name": ["a.png", "b.png"], "text": ["a", "b"]}))
    out = _rows(fs, files, image_column="file_name")
    assert out["image"] == [PNG, PNG + b"b"] and out["caption"] == ["a", "b"] and out["error"] == ["", ""]


def test_the_default_image_column_falls_back_to_hf_image_and_else_names_both(tmp_path):
    fs, files = _parquet(tmp_path, pa.table({"image": [PNG], "text": ["a"]}))
    assert [it["image"] for it in row_groups(fs, files, "text", "file_name", None)] == ["image"]
    # An HF file may keep its images' original names beside them: the default reads the images.
    fs, files = _parquet(tmp_path, pa.table({"file_name": ["gone.png"], "image": [PNG], "text": ["a"]}))
    assert [it["image"] for it in row_groups(fs, files, "text", "file_name", None)] == ["image"]
    assert [it["image"] for it in row_groups(fs, files, "text", "image", None)] == ["image"]
    fs, files = _parquet(tmp_path, pa.table({"jpg": [PNG], "text": ["a"]}))
    with pytest.raises(DatasetError, match=r"missing column 'file_name' or 'image' \(has: jpg, text\)"):
        row_groups(fs, files, "text", "file_name", None)


# ------------------------------------------------------------------------------------- near-miss file names

def test_a_metadata_name_in_another_case_is_quarantined_naming_the_file_meant(tmp_path):
    """`Images/cat.png` for `images/cat.png` opens on macOS and not on Linux: the row was quarantined as "image
    file not found", with nothing saying the file is there under another name."""
    for name in ("images/cat.png", "images/ok.png", "train/Dog.PNG"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(PNG)
    names = ["Images/cat.png", "dog.png", "gone.png", "images/ok.png"]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "a"}) + "\n" for n in names))
    rows = folder_rows(str(tmp_path))[2]
    assert [r["error"] for r in rows] == [
        "metadata line 1: file_name 'Images/cat.png': no such file; did you mean 'images/cat.png'? "
        "names are case-sensitive",
        # the same name in another folder is no guess: masks and control images live under the image's name
        "",
        "",  # no file of that name anywhere: validation says "image file not found"
        ""]
    assert [r["source"] for r in rows] == ["Images/cat.png", "dog.png", "gone.png", "images/ok.png"]


def test_a_parquet_path_in_another_case_is_quarantined_naming_the_file_meant(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "cat.png").write_bytes(PNG)
    (tmp_path / "b.png").write_bytes(PNG + b"b")
    fs, files = _parquet(tmp_path, pa.table({"file_name": ["Images/cat.png", "b.png", "cat.png", "gone.png"],
                                             "text": ["a", "b", "c", "d"]}))
    out = _rows(fs, files, image_column="file_name")
    assert out["image"] == [None, PNG + b"b", None, None]
    assert out["error"] == ["file_name 'Images/cat.png': no such file; did you mean 'images/cat.png'? names are "
                            "case-sensitive", "", "", ""]
