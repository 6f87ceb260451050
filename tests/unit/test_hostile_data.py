"""Hostile dataset rows and config files: files outside the dataset folder are never opened, rows of the
wrong JSON shape are quarantined one by one, YAML is bounded. Properties by Hypothesis."""

from __future__ import annotations

import json
import os
import re
import string

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffray import yaml_io
from diffray.config import apply_overrides, read_yaml
from diffray.data.folder import PathRules, folder_rows, member, parse_metadata
from diffray.data.parquet import image_bytes, parquet_files, read_row_group, row_groups
from diffray.errors import DatasetError
from diffray.errors import ConfigError

PNG = b"\x89PNG\r\n\x1a\n not really"


@pytest.fixture()
def hostile_folder(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.png"
    outside.write_bytes(PNG)
    (root / "ok.png").write_bytes(PNG)
    (root / "sub" / "inner.png").write_bytes(PNG)
    os.symlink(outside, root / "link_out.png")
    os.symlink(root / "ok.png", root / "link_in.png")
    lines = [
        {"file_name": "ok.png", "text": "fine"},
        {"file_name": "sub/../sub/inner.png", "text": "fine too"},
        {"file_name": "../secret.png", "text": "climbs out"},
        {"file_name": str(outside), "text": "absolute"},
        {"file_name": "link_out.png", "text": "a link out"},
        {"file_name": "link_in.png", "text": "a link that stays inside"},
        {"file_name": "s3://bucket/x.png", "text": "a URI"},
        {"file_name": ["ok.png"], "text": "a list"},
        {"file_name": "ok.png", "text": 7},
        {"file_name": "ok.png", "text": None},
    ]
    text = "\n".join(json.dumps(x) for x in lines) + '\n[1, 2]\n"just a string"\n{not json\n'
    (root / "metadata.jsonl").write_text(text)
    return root


def test_rows_outside_the_folder_or_of_the_wrong_shape_carry_their_reason(hostile_folder):
    _, _, rows = folder_rows(str(hostile_folder))
    assert len(rows) == 13
    ok = [r for r in rows if not r["error"]]
    assert [r["source"] for r in ok] == ["ok.png", "sub/inner.png", "link_in.png", "ok.png"]
    assert ok[-1]["caption"] is None  # a null caption is validation's "empty caption", not a crash
    errors = [r["error"] for r in rows if r["error"]]
    for want in ("'../secret.png' is not a file inside", f"'{hostile_folder.parent / 'secret.png'}' is not a file inside",
                 "'link_out.png' is a link to a file outside the dataset folder (data.follow_symlinks",
                 "'s3://bucket/x.png' is not a file inside", "file_name is a JSON list, not a file name",
                 "line 9: text is a JSON int, not text", "line 11: a JSON list, not an object",
                 "line 12: a JSON str, not an object", "line 13: invalid JSON"):
        assert sum(want in e for e in errors) == 1, (want, errors)
    assert [r["source"] for r in rows if r["error"]] == [f"metadata.jsonl:{n}" for n in (3, 4, 5, 7, 8, 9, 11, 12, 13)]
    assert all(isinstance(r["caption"], (str, type(None))) and isinstance(r["error"], str) for r in rows)


def test_follow_symlinks_allows_links_but_never_dotdot(hostile_folder):
    _, _, rows = folder_rows(str(hostile_folder), paths=PathRules(follow_symlinks=True))
    by_source = {r["source"] for r in rows if not r["error"]}
    assert "link_out.png" in by_source
    assert sum("'../secret.png' is not a file inside" in r["error"] for r in rows) == 1


def test_concept_folder_without_metadata_refuses_a_link_out(tmp_path):
    from diffray.data.folder import check_concept_images
    from diffray.errors import DatasetError

    (tmp_path / "c").mkdir()
    (tmp_path / "x.png").write_bytes(PNG)
    os.symlink(tmp_path / "x.png", tmp_path / "c" / "a.png")
    with pytest.raises(DatasetError, match="link to a file outside the dataset folder"):
        check_concept_images(str(tmp_path / "c"), "text", "file_name", "a photo", 1, "instance images")


def test_parquet_image_paths_stay_in_the_files_folder(tmp_path):
    fs = pafs.LocalFileSystem()
    (tmp_path / "img.png").write_bytes(PNG)
    (tmp_path.parent / "out.png").write_bytes(PNG)
    assert image_bytes(fs, {"bytes": None, "path": "img.png"}, str(tmp_path), "image") == (PNG, "")
    for hostile in ("../out.png", str(tmp_path.parent / "out.png"), "file:///etc/hostname"):
        data, why = image_bytes(fs, {"bytes": None, "path": hostile}, str(tmp_path), "image")
        assert data is None and "is not a file inside the dataset folder" in why
    assert image_bytes(fs, b"raw", str(tmp_path), "image") == (b"raw", "")
    # HF `datasets` writes absolute paths: allowed inside data.image_roots, and only there.
    roots = PathRules(roots=(str(tmp_path.parent),))
    assert image_bytes(fs, {"bytes": None, "path": str(tmp_path.parent / "out.png")}, str(tmp_path), "image",
                       roots) == (PNG, "")
    for hostile in (str(tmp_path.parent / ".." / "out.png"), "/etc/hostname", str(tmp_path.parent) + "x/a.png"):
        assert image_bytes(fs, {"bytes": None, "path": hostile}, str(tmp_path), "image", roots)[0] is None


def test_a_metadata_line_without_a_file_name_is_quarantined_naming_its_line(tmp_path):
    (tmp_path / "ok.png").write_bytes(PNG)
    lines = [{"text": "no file"}, {"file_name": "ok.png", "text": "fine"}, {"file_name": None, "text": "null"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = folder_rows(str(tmp_path))[2]
    assert [(r["source"], r["error"]) for r in rows] == [
        ("metadata.jsonl:1", "metadata line 1: no file_name"), ("ok.png", ""),
        ("metadata.jsonl:3", "metadata line 3: no file_name")]


def _shards(tmp_path, damage: str):
    """A folder of two Parquet shards, the second damaged; returns (fs, files, the damaged file)."""
    (tmp_path / "shards").mkdir()
    good, bad = tmp_path / "shards" / "part-0.parquet", tmp_path / "shards" / "part-1.parquet"
    pq.write_table(pa.table({"image": [PNG] * 4, "text": ["a red circle"] * 4}), good)
    data = good.read_bytes()
    broken = {"truncated": data[: len(data) // 2], "garbage": b"\x00 not parquet \xff" * 200, "empty": b"",
              "pages": data[:4] + b"\xff" * 100 + data[104:]}[damage]  # "pages": the footer still reads
    bad.write_bytes(broken)
    fs, files = parquet_files(str(tmp_path / "shards"))
    return fs, files, next(f for f in files if f.endswith("part-1.parquet"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_parquet_file_is_a_dataset_error_naming_it(tmp_path, damage):
    fs, files, bad = _shards(tmp_path, damage)
    with pytest.raises(DatasetError, match=rf"^{re.escape(bad)}: not a readable Parquet file"):
        row_groups(fs, files, "text", "image", None)


def test_corrupt_pages_behind_a_good_footer_are_a_dataset_error_naming_file_and_row_group(tmp_path):
    fs, files, bad = _shards(tmp_path, "pages")
    assert [it["num_rows"] for it in row_groups(fs, files, "text", "image", None)] == [4, 4]  # footers read
    assert read_row_group(fs, files[0], 0, ["image", "text"]).num_rows == 4
    with pytest.raises(DatasetError, match=rf"^{re.escape(bad)}: row group 0 is not readable Parquet"):
        read_row_group(fs, bad, 0, ["image", "text"])


@given(st.text(alphabet=string.ascii_letters + "./\\:~" + string.digits, max_size=40))
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_member_never_names_a_file_outside(tmp_path_factory, name):
    root = str(tmp_path_factory.getbasetemp() / "root")
    norm, why = member(pafs.LocalFileSystem(), root, name, "file_name")
    assert bool(norm) != bool(why)
    if norm:
        full = os.path.normpath(os.path.join(root, norm))
        assert os.path.commonpath([root, full]) == root and full != root


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                    max_leaves=10)


@given(st.lists(JSON | st.fixed_dictionaries({"file_name": JSON, "text": JSON}), min_size=1, max_size=8))
@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_jsonl_gives_one_row_per_line_with_source_or_reason(tmp_path_factory, values):
    root = tmp_path_factory.mktemp("rows")
    (root / "metadata.jsonl").write_text("".join(json.dumps(v) + "\n" for v in values))
    if not any(isinstance(v, dict) and "file_name" in v for v in values):
        return  # a column absent from every row is a config error (tested elsewhere)
    if not any(isinstance(v, dict) and "text" in v for v in values):
        return
    _, _, rows = folder_rows(str(root))
    assert len(rows) == len([v for v in values if json.dumps(v).strip()])
    for row in rows:
        assert isinstance(row["error"], str) and isinstance(row["source"], str)
        assert row["caption"] is None or isinstance(row["caption"], str)
        assert not row["error"] or row["source"].startswith("metadata.jsonl:")


def test_a_file_name_with_a_nul_character_is_a_bad_row_not_a_crash(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a\u0000.png", "text": "x"}) + "\n")
    _, _, rows = folder_rows(str(tmp_path))
    assert len(rows) == 1 and "holds a NUL character" in rows[0]["error"] and "file_name" in rows[0]["error"]


def test_images_no_metadata_row_names_and_files_a_concept_folder_skips_are_named_in_a_warning(tmp_path, caplog):
    """16 images and 2 metadata lines trained on 2 without a word; a DreamBooth folder dropped its .gif
    silently, and macOS's `._x.png` resource fork (not an image) failed the whole job as undecodable."""
    from PIL import Image

    meta, concept = tmp_path / "meta", tmp_path / "concept"
    for folder in (meta, concept):
        folder.mkdir()
        for i in range(7):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / f"{i:02d}.png")
    (meta / "metadata.jsonl").write_text('{"file_name": "00.png", "text": "a"}\n'
                                         '{"file_name": "./01.png", "text": 3}\n')  # quarantined, still named
    (meta / "._00.png").write_bytes(b"\x00\x05\x16\x07")
    with caplog.at_level("WARNING", logger="diffray.data.folder"):
        _, _, rows = folder_rows(str(meta))
    assert len(rows) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"{meta}/metadata.jsonl: 5 image file(s) beside it are in none of its rows, so not trained on: "
        "02.png, 03.png, 04.png, 05.png, 06.png"]
    caplog.clear()
    (concept / "a.gif").write_bytes(b"GIF89a")
    (concept / "._00.png").write_bytes(b"\x00\x05\x16\x07")
    (concept / ".DS_Store").write_bytes(b"\x00")
    with caplog.at_level("WARNING", logger="diffray.data.folder"):
        _, _, rows = folder_rows(str(concept), prompt="a photo of sks dog")
    assert [r["source"] for r in rows] == [f"{i:02d}.png" for i in range(7)]
    assert [r.getMessage() for r in caplog.records] == [
        f"{concept}: 1 file(s) not read, not .png/.jpg/.jpeg/.webp/.bmp: a.gif"]


def test_a_metadata_line_nested_too_deeply_is_a_bad_row_not_an_internal_error():
    """json.loads raises RecursionError, not JSONDecodeError, on `[[[[...` some thousands deep."""
    text = '{"file_name": "a.png", "text": "a"}\n' + "[" * 100_000 + "]" * 100_000 + '\n{"file_name": "b.png"}\n'
    records = parse_metadata("metadata.jsonl", text)
    assert [(n, why) for n, _, why in records] == [(1, ""), (2, "metadata line 2: JSON nested too deeply"), (3, "")]


def test_an_unpaired_surrogate_escape_in_a_caption_or_file_name_is_a_bad_row_not_a_crash(tmp_path):
    # JSON allows "\ud83d" alone (JavaScript's JSON.stringify writes it for a string cut inside an emoji);
    # the tokenizer and every path call refuse it, so such a row must be quarantined, naming its line.
    (tmp_path / "ok.png").write_bytes(PNG)
    lines = [{"file_name": "ok.png", "text": "a dog \ud83d"}, {"file_name": "ok\ud83d.png", "text": "x"},
             {"file_name": "ok.png", "text": "a dog \U0001f436"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = folder_rows(str(tmp_path))[2]
    assert [(r["source"], r["caption"]) for r in rows] == [
        ("metadata.jsonl:1", None), ("metadata.jsonl:2", "x"), ("ok.png", "a dog \U0001f436")]
    assert rows[0]["error"] == ("metadata line 1: text holds an unpaired UTF-16 surrogate ('\\ud83d' at character 6:"
                                " a string cut inside an emoji?), not text")
    assert rows[1]["error"] == ("metadata line 2: file_name 'ok\\ud83d.png' holds an unpaired UTF-16 surrogate, "
                                "not a file name")
    assert not rows[2]["error"]


def test_parse_metadata_keeps_line_numbers():
    got = parse_metadata("metadata.jsonl", '{"a": 1}\n\n[]\n')
    assert got == [(1, {"a": 1}, ""), (3, None, "metadata line 3: a JSON list, not an object")]


# ------------------------------------------------------------------------------------------------ YAML

BOMB = "".join(f"{k}: &{k} [{', '.join([f'*{p}'] * 9)}]\n" for p, k in zip("abcdefgh", "bcdefghi"))
BOMB = 'a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\n' + BOMB


@pytest.mark.parametrize("text, limit", [
    (BOMB, "more than 100000 values once aliases are expanded"),
    ("x: " + "[" * 2000 + "]" * 2000, "nested deeper than 32 levels"),
    ("a: &a [1]\n" + "".join(f"b{i}: &b{i} [*{'a' if i == 0 else f'b{i - 1}'}]\n" for i in range(40)),
     "nested deeper than 32 levels once aliases are expanded"),
    ("a: &a 1\nb: [" + ", ".join(["*a"] * 101) + "]\n", "more than 100 aliases"),
    ("a: '" + "x" * (yaml_io.MAX_BYTES + 1) + "'\n", "bytes; the limit"),
])
def test_yaml_limits_are_one_config_error_naming_the_file(tmp_path, text, limit):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_yaml(path)
    assert str(err.value).startswith(f"{path}: ") and limit in str(err.value) and "\n" not in str(err.value)


def test_yaml_bomb_in_an_override_is_refused():
    with pytest.raises(ConfigError, match=r"^lora.rank: override lora.rank: more than 100 aliases"):
        apply_overrides({}, ["lora.rank=[&a 1, " + ", ".join(["*a"] * 101) + "]"])


def test_yaml_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_bytes(b"run: {name: \xff\xfe}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_yaml(path)


# Strings such as "0E0", which PyYAML writes unquoted and our loader reads as the number they look like, on purpose
TEXT = st.text(max_size=10).filter(lambda s: not yaml_io.EXPONENT_FLOAT.match(s))
CONFIG = st.recursive(st.none() | st.booleans() | st.integers() | TEXT,
                      lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
                      max_leaves=25)


@given(CONFIG)
@settings(max_examples=300)
def test_bounded_loader_reads_what_safe_dump_writes(value):
    assert yaml_io.load(yaml.safe_dump(value)) == yaml.safe_load(yaml.safe_dump(value))


@given(st.text(max_size=200))
@settings(max_examples=500)
def test_bounded_loader_raises_only_yaml_errors(text):
    try:
        yaml_io.load(text)
    except (yaml.YAMLError, yaml_io.YamlLimitError):
        pass


KEY = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}(\.[A-Za-z_][A-Za-z0-9_]{0,6}){0,3}", fullmatch=True)
SCALAR = st.integers(-10**6, 10**6) | st.booleans() | st.text(alphabet=string.ascii_letters + " _-", max_size=12)


@given(KEY, SCALAR)
@settings(max_examples=300)
def test_an_override_sets_exactly_its_key(key, value):
    out = apply_overrides({}, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"])
    node = out
    for part in key.split("."):
        node = node[part]
    assert node == (value if not isinstance(value, str) or value.strip() else "") or node == yaml.safe_load(
        yaml.safe_dump(value))


@given(st.text(max_size=60))
@settings(max_examples=500)
def test_any_override_text_is_applied_or_one_config_error(item):
    try:
        apply_overrides({"a": {"b": 1}}, [item])
    except ConfigError as exc:
        assert "\n" not in str(exc)[:200] or "=" not in item


@given(st.binary(max_size=2048) | st.none(), st.none() | st.text(max_size=20) | st.integers() | st.binary(max_size=8))
@settings(max_examples=400)
def test_the_row_validator_answers_a_reason_or_none_for_any_cell(image, caption):
    from diffray.data.validate import Rules, check_row

    batch = {"image": [image], "caption": [caption], "source": ["x.png"], "error": [""]}
    reason = check_row(batch, 0, Rules())
    assert reason is None or (isinstance(reason, str) and reason and "\n" not in reason)
    if image is None or not image.startswith(b"\x89PNG"):
        assert reason is not None  # nothing but a decodable image is usable
