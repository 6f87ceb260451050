"""`diffray feedback export` on hostile input, run as a user runs it: a store file that is no store (text, a
truncated database, a folder, missing, another program's table, a newer schema), a store locked by another
process, records damaged after they were stored, an output under a file. Each is one line naming the file
and what to do (exit 2 for the inputs, 1 for a lock), the store is left byte for byte, and no Parquet file,
temp file or folder made by the export is left behind."""

from __future__ import annotations

import base64
import io
import os
import re
import sqlite3
from contextlib import closing

import pyarrow.parquet as pq
import pytest
from PIL import Image
from testkit.cli import diffray

from diffray.errors import ConfigError
from diffray.serve.config import FeedbackSection, Limits
from diffray.serve.feedback import FeedbackRequest, feedback_record
from diffray.serve.feedback_store import FeedbackStore


def png_b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def store_with(path, n: int) -> FeedbackStore:
    store = FeedbackStore(path)
    for i in range(n):
        req = FeedbackRequest(id=f"record-{i:04d}", prompt=f"prompt {i}", choice="left",
                              images=[{"b64_json": png_b64((200, 30, 30))}, {"b64_json": png_b64((20, 20, 220))}])
        store.add(feedback_record(req, Limits(), FeedbackSection(), None))
    return store


def sql(path, *statements) -> None:
    with closing(sqlite3.connect(path)) as db:
        for statement in statements:
            db.execute(statement)
        db.commit()


def left_behind(folder) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.suffix in (".parquet", ".tmp"))


def no_store(tmp_path, kind):
    path = tmp_path / "fb.db"
    if kind == "text":
        path.write_text("prompt,choice\na red circle,left\n")
    elif kind == "truncated":  # the first pages (header, schema) kept, the table's cut off
        full = store_with(tmp_path / "full.db", 40).path.read_bytes()
        path.write_bytes(full[:len(full) // 2])
        (tmp_path / "full.db").unlink()
    elif kind == "folder":
        path.mkdir()
    elif kind == "other program":
        sql(path, "CREATE TABLE users (name TEXT)")
    elif kind == "other schema":
        sql(path, "CREATE TABLE feedback (id TEXT PRIMARY KEY, prompt TEXT, choice TEXT)",
            "INSERT INTO feedback VALUES ('a', 'b', 'left')")
    elif kind == "newer":
        store_with(path, 1)
        sql(path, "PRAGMA user_version = 2")
    return path


@pytest.mark.parametrize("kind,says", [
    ("text", "fb.db is not a SQLite database, so no feedback store: name the store's file (--db, or feedback.path"),
    ("truncated", "feedback store {db} is damaged (database disk image is malformed): restore it from a backup"),
    ("folder", "fb.db is a folder, not a feedback store: name the SQLite file"),
    ("missing", "no feedback store at {db} (feedback.path of the serve config, or --db): check the path"),
    ("other program", "fb.db is not a feedback store (no feedback table)"),
    ("other schema", "fb.db: its feedback table has no column created, digest, negative_prompt, user, model_0"),
    ("newer", "fb.db: a feedback store of schema version 2, written by a newer diffray (this one reads version 1)"),
])
def test_a_store_path_that_is_no_store_is_one_line_and_left_as_it_was(tmp_path, monkeypatch, capsys, kind, says):
    db = no_store(tmp_path, kind)
    before = db.read_bytes() if db.is_file() else None
    code, text = diffray(["feedback", "export", tmp_path / "out" / "o.parquet", "--db", db], monkeypatch, capsys)
    assert code == 2 and text.startswith("diffray: error: ") and text.count("\n") == 1, text
    assert says.format(db=db) in text, text
    assert (db.read_bytes() if db.is_file() else None) == before
    assert left_behind(tmp_path) == [] and not (tmp_path / "out").exists()


def test_the_server_refuses_a_folder_or_a_store_of_another_schema_and_stamps_its_version(tmp_path):
    db = no_store(tmp_path, "other schema")
    with pytest.raises(ConfigError, match="its feedback table has no column created"):
        FeedbackStore(db)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(tmp_path))} is a folder, not a feedback store"):
        FeedbackStore(tmp_path)
    with closing(sqlite3.connect(store_with(tmp_path / "new.db", 0).path)) as new:
        assert new.execute("PRAGMA user_version").fetchone()[0] == 1  # what a later schema compares against


def damage(db, how) -> None:
    second = "WHERE id = 'record-0001'"
    sql(db, {"not an image": f"UPDATE feedback SET image_1 = x'00ff' {second}",
             "truncated png": f"UPDATE feedback SET image_0 = substr(image_0, 1, length(image_0) - 20) {second}",
             "text for an image": f"UPDATE feedback SET image_0 = 'a picture' {second}",
             "unknown choice": f"UPDATE feedback SET choice = 'maybe' {second}",
             "bad utf-8 prompt": f"UPDATE feedback SET prompt = CAST(x'41ff42' AS TEXT) {second}"}[how])


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
@pytest.mark.parametrize("how,says", [
    ("not an image", "image_1 is no image (neither PNG nor another format PIL reads)"),
    ("truncated png", "image_0 is no readable image"),
    ("text for an image", "image_0 is str, not image bytes"),
    ("unknown choice", "choice 'maybe' is none of left, right, tie, both_bad"),
    ("bad utf-8 prompt", "prompt is not UTF-8 text: 'A\\udcffB'"),
])
def test_a_damaged_record_is_named_nothing_is_written_and_the_advice_works(tmp_path, monkeypatch, capsys, fmt,
                                                                           how, says):
    db = store_with(tmp_path / "fb.db", 3).path
    damage(db, how)
    before, out = db.read_bytes(), tmp_path / "new" / "pairs.parquet"
    code, text = diffray(["feedback", "export", out, "--db", db, "--format", fmt], monkeypatch, capsys)
    assert code == 2 and text.count("\n") == 1, text
    assert f"{db}: record 'record-0001' is damaged ({says}" in text, text
    assert db.read_bytes() == before and left_behind(tmp_path) == [] and not out.parent.exists()
    fix = text.split("`")[1]  # the command the line gives
    assert fix == f'sqlite3 {db} "DELETE FROM feedback WHERE rowid=2"'
    sql(db, fix.split('"')[1])
    code, text = diffray(["feedback", "export", out, "--db", db, "--format", fmt], monkeypatch, capsys)
    assert code == 0 and pq.read_table(out).column("ranking_id").to_pylist() == ["record-0000", "record-0002"]


def test_a_png_export_is_checked_too_and_a_prompt_with_nul_is_kept_verbatim(tmp_path, monkeypatch, capsys):
    db = store_with(tmp_path / "fb.db", 2).path
    sql(db, "UPDATE feedback SET prompt = 'a' || char(0) || 'b' WHERE id = 'record-0000'")
    code, text = diffray(["feedback", "export", tmp_path / "o.parquet", "--db", db, "--format", "png"],
                         monkeypatch, capsys)
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert code == 0 and [r["caption"] for r in rows] == ["a\x00b", "prompt 1"]
    assert all(r["jpg_0"].startswith(b"\x89PNG") for r in rows)


def test_a_store_locked_by_another_process_says_so_and_a_plain_writer_does_not_block(tmp_path, monkeypatch,
                                                                                   capsys):
    from diffray.serve import feedback_store

    monkeypatch.setattr(feedback_store, "BUSY_TIMEOUT_MS", 300)  # the 30 s wait, shortened
    db = store_with(tmp_path / "fb.db", 2).path
    out = tmp_path / "o.parquet"
    with closing(sqlite3.connect(db, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")  # a replica mid-post: the export reads the committed snapshot
        writer.execute("DELETE FROM feedback WHERE id = 'record-0000'")
        code, text = diffray(["feedback", "export", out, "--db", db], monkeypatch, capsys)
        assert code == 0 and pq.read_table(out).num_rows == 2, text
        writer.execute("ROLLBACK")
        writer.execute("PRAGMA locking_mode = EXCLUSIVE")  # a process that keeps the file to itself
        writer.execute("BEGIN EXCLUSIVE")
        writer.execute("DELETE FROM feedback WHERE id = 'record-0000'")
        code, text = diffray(["feedback", "export", tmp_path / "p.parquet", "--db", db], monkeypatch, capsys)
        writer.execute("ROLLBACK")
    assert code == 1 and text == (f"diffray: error: feedback store {db} is locked by another process (waited 0.3 s): "
                                  "retry once it has finished\n")
    assert not (tmp_path / "p.parquet").exists() and FeedbackStore(db).count() == 2


def test_an_output_under_a_file_is_one_line_and_an_existing_output_is_kept_after_a_failure(tmp_path, monkeypatch,
                                                                                         capsys):
    db = store_with(tmp_path / "fb.db", 2).path
    (tmp_path / "afile").write_text("notes")
    code, text = diffray(["feedback", "export", tmp_path / "afile" / "sub" / "o.parquet", "--db", db],
                         monkeypatch, capsys)
    assert code == 2 and text == (f"diffray: error: {tmp_path}/afile/sub/o.parquet: {tmp_path}/afile is a file, not "
                                  "a folder: choose another path for the Parquet file\n")
    out = tmp_path / "o.parquet"
    assert diffray(["feedback", "export", out, "--db", db], monkeypatch, capsys)[0] == 0
    before = out.read_bytes()
    damage(db, "not an image")
    assert diffray(["feedback", "export", out, "--db", db], monkeypatch, capsys)[0] == 2
    assert out.read_bytes() == before and left_behind(tmp_path) == ["o.parquet"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_store_says_permission_denied(tmp_path, monkeypatch, capsys):
    db = store_with(tmp_path / "fb.db", 1).path
    db.chmod(0)
    try:
        code, text = diffray(["feedback", "export", tmp_path / "o.parquet", "--db", db], monkeypatch, capsys)
    finally:
        db.chmod(0o600)
    assert code == 1 and f"feedback store {db}: permission denied" in text and text.count("\n") == 1, text


def test_format_names_its_option_once_and_takes_any_case(tmp_path, monkeypatch, capsys):
    db = store_with(tmp_path / "fb.db", 1).path
    code, text = diffray(["feedback", "export", tmp_path / "o.parquet", "--db", db, "--format", "gif"],
                         monkeypatch, capsys)
    assert code == 2 and text == "diffray: error: --format: 'gif': use jpeg or png\n"
    for fmt, magic in [("PNG", b"\x89PNG"), ("JPG", b"\xff\xd8")]:
        code, text = diffray(["data", "export-feedback", tmp_path / "o.parquet", "--db", db, "--format", fmt],
                             monkeypatch, capsys)
        assert code == 0 and pq.read_table(tmp_path / "o.parquet").column("jpg_0")[0].as_py().startswith(magic)


def test_a_store_damaged_while_serving_answers_503_and_logs_how_to_recover(tmp_path, caplog):
    """`add` turned only SQLite's OperationalError into a 503: a store damaged on disk while the server ran
    (SQLITE_CORRUPT, a DatabaseError) reached the app as an unexpected 500 "internal error: DatabaseError", with
    nothing telling the operator what happened. Now a 503 saying the store is damaged, and an error in the
    server's log naming the file and the recovery command."""
    import logging

    from diffray.errors import RequestError

    store = store_with(tmp_path / "fb.db", 60)
    sql(store.path, "PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(store.path.read_bytes())
    data[4096:3 * 4096] = b"\xab" * (2 * 4096)  # the table's pages damaged on disk
    store.path.write_bytes(bytes(data))
    req = FeedbackRequest(id="after-0001", prompt="p", choice="left",
                          images=[{"b64_json": png_b64((1, 2, 3))}, {"b64_json": png_b64((4, 5, 6))}])
    with caplog.at_level(logging.ERROR, logger="diffray.serve.feedback_store"), pytest.raises(RequestError) as err:
        store.add(feedback_record(req, Limits(), FeedbackSection(), None))
    assert err.value.status == 503 and "damaged" in err.value.message
    assert not hasattr(err.value, "retry_after")  # a retry cannot help
    assert f"feedback store {store.path} is damaged" in caplog.text and ".recover" in caplog.text
