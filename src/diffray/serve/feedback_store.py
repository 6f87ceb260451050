"""The durable preference store behind `POST /v1/feedback`, and its export as a Pick-a-Pic-style Parquet
dataset (`diffray data export-feedback`).

SQLite in WAL mode: several Ingress replicas (processes) on one node write to the same file, each write one
`BEGIN IMMEDIATE` transaction with `synchronous=FULL`, so a post is answered only once it is on disk and
survives any process crash. Images are BLOBs in the same row: a record and its images commit together,
with no orphan files to clean up. A client id makes retries idempotent (the same id and content is stored
once; the same id with other content is a 409). The file must be on a local disk (SQLite's locking is not
safe over network filesystems). The schema's version is the file's `PRAGMA user_version`: a feedback
table of another schema or a newer version is refused naming the file, never altered. Never imports ray or
torch.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path

from diffray.errors import ConfigError, DiffrayError, RequestError, StorageError
from diffray.serve.feedback import FeedbackRecord
from diffray.storage import nearest_existing_above

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    digest TEXT NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT,
    choice TEXT NOT NULL,
    user TEXT,
    model_0 TEXT NOT NULL,
    model_1 TEXT NOT NULL,
    params_0 TEXT NOT NULL,
    params_1 TEXT NOT NULL,
    image_0 BLOB NOT NULL,
    image_1 BLOB NOT NULL
)"""
COLUMNS = [line.split()[0] for line in SCHEMA.strip().splitlines()[1:-1]]
SCHEMA_VERSION = 1  # PRAGMA user_version: 0 is a store made before versions (the same columns)
LABELS = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5), "both_bad": (0.0, 0.0)}
BUSY_TIMEOUT_MS = 30_000
EXPORT_BATCH_ROWS, EXPORT_BATCH_BYTES = 256, 64 << 20  # one Parquet row group: at most this many rows or bytes


class FeedbackStore:
    """Preference records in one SQLite file (created with its folder when missing)."""

    def __init__(self, path: str | Path, create: bool = True):
        """`create` False: only open an existing store, writing nothing (an export of a wrong file changes
        nothing in it). Raises ConfigError naming the file when it is no feedback store this version reads,
        StorageError when it cannot be opened now (locked, unreadable)."""
        self.path = Path(path).expanduser()
        try:
            if not create:
                with closing(self._connect()) as db:
                    self._check_schema(db)
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as db:
                if db.execute("PRAGMA table_info(feedback)").fetchone():  # a foreign table is left as it is
                    self._check_schema(db)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
                if db.execute("PRAGMA user_version").fetchone()[0] == 0:
                    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except (OSError, sqlite3.Error) as exc:
            raise store_error(self.path, exc) from None

    def _check_schema(self, db: sqlite3.Connection) -> None:
        """Refuse a file whose feedback table this version cannot read or write (never changes it)."""
        columns = {r[1] for r in db.execute("PRAGMA table_info(feedback)")}
        if not columns:
            raise ConfigError(f"{self.path} is not a feedback store (no feedback table): name the store's file "
                              "(--db, or feedback.path of the serve config)")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(f"{self.path}: a feedback store of schema version {version}, written by a newer "
                              f"diffray (this one reads version {SCHEMA_VERSION}): use that diffray to export it")
        missing = [c for c in COLUMNS if c not in columns]
        if missing:
            raise ConfigError(f"{self.path}: its feedback table has no column {', '.join(missing)} (another "
                              "program's table, not a diffray feedback store): name the store's file")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA synchronous=FULL")  # a post answered 200 is on disk
        return db

    def add(self, rec: FeedbackRecord) -> tuple[str, float, bool]:
        """Store `rec`; returns (id, created, duplicate). Raises RequestError 409 when the id is taken by
        other content, 503 (with Retry-After) when the store cannot write now (locked past the busy timeout by
        other writers, disk full or failing): nothing was stored, a retry is safe."""
        rec_id, digest = rec.id or uuid.uuid4().hex, rec.digest()
        try:
            with closing(self._connect()) as db:
                db.execute("BEGIN IMMEDIATE")
                try:
                    row = db.execute("SELECT digest, created FROM feedback WHERE id = ?", (rec_id,)).fetchone()
                    if row is None:
                        db.execute("INSERT INTO feedback VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                                   (rec_id, rec.created, digest, rec.prompt, rec.negative_prompt, rec.choice,
                                    rec.user, rec.models[0], rec.models[1], json.dumps(rec.params[0]),
                                    json.dumps(rec.params[1]), rec.images[0], rec.images[1]))
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # SQLite may have rolled back itself (disk full, I/O error)
                        db.execute("ROLLBACK")
                    raise
        except sqlite3.OperationalError as exc:  # the server's state, not the request's: 503, never a bare 500
            err = RequestError(f"the feedback store cannot write now ({exc}); retry later", status=503,
                               kind="unavailable")
            err.retry_after = 1  # type: ignore[attr-defined]
            raise err from None
        except sqlite3.DatabaseError as exc:  # damaged on disk: no retry helps, the operator must act
            log.error("%s", store_error(self.path, exc))
            raise RequestError("the feedback store is damaged and cannot take feedback; the server's log says "
                               "how to recover it", status=503, kind="unavailable") from None
        if row is None:
            return rec_id, rec.created, False
        if row[0] != digest:
            raise RequestError("this id was already used for a different comparison", param="id", status=409,
                               kind="conflict")
        return rec_id, row[1], True

    def count(self) -> int:
        with closing(self._connect()) as db:
            return int(db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0])

    def rows(self, batch: int = 256):
        """Every record (a dict per row), oldest first, read in one snapshot. Text that is not UTF-8 (written
        by another program) comes as str with surrogate escapes: `pickapic_row` names its record."""
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            db.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
            db.execute("BEGIN")  # one read snapshot: concurrent writers do not change what we export
            # the order from the rowids alone, then the rows by rowid: `SELECT * ... ORDER BY` would copy every
            # image through SQLite's sorter (temp files as large as the store); ints, not ids, held meanwhile
            keys = [r[0] for r in db.execute("SELECT rowid FROM feedback ORDER BY created, id")]
            for start in range(0, len(keys), batch):
                chunk = keys[start:start + batch]
                found = {r["rowid"]: dict(r) for r in db.execute(
                    f"SELECT rowid, * FROM feedback WHERE rowid IN ({','.join('?' * len(chunk))})", chunk)}
                yield from (found[k] for k in chunk)
            db.execute("COMMIT")


def store_error(path: Path, exc: BaseException) -> DiffrayError:
    """One line for a store SQLite cannot open or read: what the file is and what to do."""
    name = getattr(exc, "sqlite_errorname", "")
    if path.is_dir():
        return ConfigError(f"{path} is a folder, not a feedback store: name the SQLite file (--db, or feedback.path "
                           "of the serve config)")
    if name == "SQLITE_NOTADB":
        return ConfigError(f"{path} is not a SQLite database, so no feedback store: name the store's file (--db, or "
                           "feedback.path of the serve config)")
    if name.startswith("SQLITE_CORRUPT"):
        return ConfigError(f"feedback store {path} is damaged ({exc}): restore it from a backup, or recover it "
                           f"with `sqlite3 {path} .recover`")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StorageError(f"feedback store {path} is locked by another process (waited {BUSY_TIMEOUT_MS / 1000:g} "
                            "s): retry once it has finished")
    if name.startswith("SQLITE_CANTOPEN") and path.exists() and not os.access(path, os.R_OK):
        return StorageError(f"feedback store {path}: permission denied: run as a user who may read it")
    return StorageError(f"feedback store {path}: cannot open ({exc})")


def _image(data, fmt: str, column: str) -> bytes:
    """A stored image as `fmt` bytes; ValueError naming `column` when it is no readable image."""
    from PIL import Image

    if not isinstance(data, bytes):
        raise ValueError(f"{column} is {type(data).__name__}, not image bytes")
    try:
        with Image.open(io.BytesIO(data)) as img:
            stored = img.format
            if stored == "PNG":
                img.verify()  # every chunk whole and its checksum right (a JPEG copy may decode a cut one)
        if fmt == "png" and stored == "PNG":
            return data
        with Image.open(io.BytesIO(data)) as img:  # JPEG, or PNG from another program's format
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
            return buf.getvalue()
    except Image.UnidentifiedImageError:
        raise ValueError(f"{column} is no image (neither PNG nor another format PIL reads)") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ValueError(f"{column} is no readable image: {type(exc).__name__}: {exc}") from None


def _check_fields(row: dict) -> None:
    """ValueError naming the first column of `row` that no store written by diffray holds."""
    if row["choice"] not in LABELS:
        raise ValueError(f"choice {row['choice']!r} is none of {', '.join(LABELS)}")
    if isinstance(row["created"], bool) or not isinstance(row["created"], (int, float)):
        raise ValueError(f"created {row['created']!r} is no time")
    for key in ("id", "prompt", "negative_prompt", "user", "model_0", "model_1", "params_0", "params_1"):
        if row[key] is None and key in ("negative_prompt", "user"):
            continue
        if not isinstance(row[key], str):
            raise ValueError(f"{key} is {type(row[key]).__name__}, not text")
        try:
            row[key].encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{key} is not UTF-8 text: {ascii(row[key])[:80]}") from None


def pickapic_row(row: dict, fmt: str) -> dict:
    """One stored record as a Pick-a-Pic v2 row (plus diffray's own columns). Raises ValueError naming the
    column when the record is damaged (written over by another program, or on disk)."""
    import hashlib

    _check_fields(row)
    label_0, label_1 = LABELS[row["choice"]]
    images = [_image(row[f"image_{i}"], fmt, f"image_{i}") for i in (0, 1)]
    uids = [hashlib.sha1(row[f"image_{i}"]).hexdigest() for i in (0, 1)]
    return {"caption": row["prompt"], "jpg_0": images[0], "jpg_1": images[1],
            "label_0": label_0, "label_1": label_1, "choice": row["choice"],
            "has_label": row["choice"] != "both_bad", "are_different": uids[0] != uids[1],
            "best_image_uid": uids[0] if label_0 > label_1 else uids[1] if label_1 > label_0 else "",
            "image_0_uid": uids[0], "image_1_uid": uids[1], "model_0": row["model_0"], "model_1": row["model_1"],
            "ranking_id": row["id"], "created_at": row["created"], "user_id": row["user"] or "",
            "negative_prompt": row["negative_prompt"], "params_0": row["params_0"], "params_1": row["params_1"]}


def _export_target(db_file: Path, out: Path) -> None:
    """Refuse a store path that is no file, and an output that is the store, a folder, or under a file."""
    if db_file.is_dir():
        raise ConfigError(f"{db_file} is a folder, not a feedback store: name the SQLite file (--db, or "
                          "feedback.path of the serve config)")
    if not db_file.is_file():
        raise ConfigError(f"no feedback store at {db_file} (feedback.path of the serve config, or --db): check the "
                          "path; the server creates it when it starts")
    store_files = {Path(f"{db_file.resolve()}{s}") for s in ("", "-wal", "-shm", "-journal")}
    if out.resolve() in store_files or (out.is_file() and os.path.samefile(out, db_file)):
        raise ConfigError(f"{out} is the feedback store itself: export to another file")
    if out.is_dir():
        raise ConfigError(f"{out} is a folder: name the Parquet file to write")
    above = nearest_existing_above(out)
    if not above.is_dir():
        raise ConfigError(f"{out}: {above} is a file, not a folder: choose another path for the Parquet file")


def export_parquet(db_path: str | Path, out: str | Path, image_format: str = "jpeg") -> int:
    """Write every record to `out` (one Parquet file, written aside and renamed into place); returns the
    number of rows. `image_format` jpeg (Pick-a-Pic's `jpg_*`) or png (lossless). The store is only read.

    Raises:
        ConfigError: no store at `db_path` (missing, a folder, not SQLite, another schema, damaged: a damaged
            record is named), or `out` is the store itself, a folder or under a file.
        StorageError, DiffrayError: the store is locked or unreadable, or `out` cannot be written.
        No partial file, nor a folder the export made, is left behind.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffray.storage import first_missing

    db_file, out = Path(db_path).expanduser(), Path(out).expanduser()
    _export_target(db_file, out)
    store = FeedbackStore(db_file, create=False)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64()), ("choice", pa.string()),
                        ("has_label", pa.bool_()), ("are_different", pa.bool_()), ("best_image_uid", pa.string()),
                        ("image_0_uid", pa.string()), ("image_1_uid", pa.string()), ("model_0", pa.string()),
                        ("model_1", pa.string()), ("ranking_id", pa.string()),
                        ("created_at", pa.timestamp("us", tz="UTC")), ("user_id", pa.string()),
                        ("negative_prompt", pa.string()), ("params_0", pa.string()), ("params_1", pa.string())])
    tmp, made = out.with_name(f".{out.name}.{os.getpid()}.tmp"), first_missing(out.parent)
    n, batch, size, done = 0, [], 0, False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(tmp, schema) as writer:
            for row in store.rows(batch=16):  # images of up to max_image_side: memory bounded by bytes too
                try:
                    batch.append(pickapic_row(row, image_format))
                except ValueError as exc:
                    raise ConfigError(f"{db_file}: record {ascii(row['id'])} is damaged ({exc}); nothing exported. "
                                      f"Back the store up, remove it with `sqlite3 {db_file} \"DELETE FROM feedback "
                                      f"WHERE rowid={row['rowid']}\"`, export again") from None
                size += len(batch[-1]["jpg_0"]) + len(batch[-1]["jpg_1"])
                if len(batch) == EXPORT_BATCH_ROWS or size >= EXPORT_BATCH_BYTES:
                    writer.write_table(_table(batch, schema))
                    n, batch, size = n + len(batch), [], 0
            if batch or n == 0:
                writer.write_table(_table(batch, schema))
                n += len(batch)
        os.replace(tmp, out)
        done = True
    except sqlite3.Error as exc:
        raise store_error(db_file, exc) from None
    except (OSError, pa.ArrowException) as exc:
        raise DiffrayError(f"cannot export {db_path} to {out}: {exc}") from None
    finally:
        if not done:
            _undo(tmp, made)
    return n


def _undo(tmp: Path, made: Path | None) -> None:
    """After a failed export: no partial file, and no folder it made (only emptied ones are removed)."""
    try:
        tmp.unlink(missing_ok=True)
        folder = tmp.parent
        while made is not None and folder.is_relative_to(made):
            folder.rmdir()
            folder = folder.parent
    except OSError:
        pass  # the first error is the one to report


def _table(rows: list[dict], schema):
    import pyarrow as pa

    cols = {f.name: [r[f.name] for r in rows] for f in schema}
    cols["created_at"] = [int(t * 1e6) for t in cols["created_at"]]
    return pa.table(cols, schema=schema)
