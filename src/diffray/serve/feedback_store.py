"""The durable preference store behind `POST /v1/feedback`, and its export as a Pick-a-Pic-style Parquet
dataset (`diffray data export-feedback`).

SQLite in WAL mode: several Ingress replicas (processes) on one node write to the same file, each write one
`BEGIN IMMEDIATE` transaction with `synchronous=FULL`, so a post is answered only once it is on disk and
survives any process crash. Images are BLOBs in the same row: a record and its images commit together,
with no orphan files to clean up. A client id makes retries idempotent (the same id and content is stored
once; the same id with other content is a 409). The file must be on a local disk (SQLite's locking is not
safe over network filesystems). Never imports ray or torch.
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path

from diffray.errors import DiffrayError, RequestError
from diffray.serve.feedback import FeedbackRecord

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
LABELS = {"left": (1.0, 0.0), "right": (0.0, 1.0), "tie": (0.5, 0.5), "both_bad": (0.0, 0.0)}
BUSY_TIMEOUT_MS = 30_000
EXPORT_BATCH_ROWS, EXPORT_BATCH_BYTES = 256, 64 << 20  # one Parquet row group: at most this many rows or bytes


class FeedbackStore:
    """Preference records in one SQLite file (created with its folder when missing)."""

    def __init__(self, path: str | Path, create: bool = True):
        """`create` False: only open an existing store, writing nothing (an export of a wrong file changes
        nothing in it). Raises DiffrayError naming the file."""
        self.path = Path(path).expanduser()
        try:
            if not create:
                with closing(self._connect()) as db:
                    found = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='feedback'")
                    if found.fetchone() is None:
                        raise DiffrayError(f"{self.path} is not a feedback store (no feedback table)")
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(SCHEMA)
                db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise DiffrayError(f"feedback store {self.path}: cannot open ({exc})") from None

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
        """Every record (a dict per row), oldest first, read in one snapshot."""
        with closing(self._connect()) as db:
            db.row_factory = sqlite3.Row
            db.execute("BEGIN")  # one read snapshot: concurrent writers do not change what we export
            # the order from the ids alone, then the rows by primary key: `SELECT * ... ORDER BY` would copy
            # every image through SQLite's sorter (temp files as large as the store)
            ids = [r[0] for r in db.execute("SELECT id FROM feedback ORDER BY created, id")]
            for start in range(0, len(ids), batch):
                chunk = ids[start:start + batch]
                found = {r["id"]: dict(r) for r in db.execute(
                    f"SELECT * FROM feedback WHERE id IN ({','.join('?' * len(chunk))})", chunk)}
                yield from (found[i] for i in chunk)
            db.execute("COMMIT")


def _image(data: bytes, fmt: str) -> bytes:
    if fmt == "png":
        return data
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def pickapic_row(row: dict, fmt: str) -> dict:
    """One stored record as a Pick-a-Pic v2 row (plus diffray's own columns)."""
    import hashlib

    label_0, label_1 = LABELS[row["choice"]]
    uids = [hashlib.sha1(row[f"image_{i}"]).hexdigest() for i in (0, 1)]
    return {"caption": row["prompt"], "jpg_0": _image(row["image_0"], fmt), "jpg_1": _image(row["image_1"], fmt),
            "label_0": label_0, "label_1": label_1, "choice": row["choice"],
            "has_label": row["choice"] != "both_bad", "are_different": uids[0] != uids[1],
            "best_image_uid": uids[0] if label_0 > label_1 else uids[1] if label_1 > label_0 else "",
            "image_0_uid": uids[0], "image_1_uid": uids[1], "model_0": row["model_0"], "model_1": row["model_1"],
            "ranking_id": row["id"], "created_at": row["created"], "user_id": row["user"] or "",
            "negative_prompt": row["negative_prompt"], "params_0": row["params_0"], "params_1": row["params_1"]}


def export_parquet(db_path: str | Path, out: str | Path, image_format: str = "jpeg") -> int:
    """Write every record to `out` (one Parquet file, written aside and renamed into place); returns the
    number of rows. `image_format` jpeg (Pick-a-Pic's `jpg_*`) or png (lossless).

    Raises:
        DiffrayError: no store at `db_path`, `out` is the store itself or a folder, or cannot be written (no
            partial file is left behind).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    db_file = Path(db_path).expanduser()
    if not db_file.is_file():
        raise DiffrayError(f"no feedback store at {db_path} (feedback.path of the serve config)")
    out = Path(out).expanduser()
    store_files = {Path(f"{db_file.resolve()}{s}") for s in ("", "-wal", "-shm", "-journal")}
    if out.resolve() in store_files or (out.is_file() and os.path.samefile(out, db_file)):
        raise DiffrayError(f"{out} is the feedback store itself: export to another file")
    if out.is_dir():
        raise DiffrayError(f"{out} is a folder: name the Parquet file to write")
    store = FeedbackStore(db_file, create=False)
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64()), ("choice", pa.string()),
                        ("has_label", pa.bool_()), ("are_different", pa.bool_()), ("best_image_uid", pa.string()),
                        ("image_0_uid", pa.string()), ("image_1_uid", pa.string()), ("model_0", pa.string()),
                        ("model_1", pa.string()), ("ranking_id", pa.string()),
                        ("created_at", pa.timestamp("us", tz="UTC")), ("user_id", pa.string()),
                        ("negative_prompt", pa.string()), ("params_0", pa.string()), ("params_1", pa.string())])
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    n, batch, size = 0, [], 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with pq.ParquetWriter(tmp, schema) as writer:
            for row in store.rows(batch=16):  # images of up to max_image_side: memory bounded by bytes too
                batch.append(pickapic_row(row, image_format))
                size += len(batch[-1]["jpg_0"]) + len(batch[-1]["jpg_1"])
                if len(batch) == EXPORT_BATCH_ROWS or size >= EXPORT_BATCH_BYTES:
                    writer.write_table(_table(batch, schema))
                    n, batch, size = n + len(batch), [], 0
            if batch or n == 0:
                writer.write_table(_table(batch, schema))
                n += len(batch)
        os.replace(tmp, out)
    except (OSError, sqlite3.Error) as exc:
        raise DiffrayError(f"cannot export {db_path} to {out}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)  # a failed export leaves no partial file
    return n


def _table(rows: list[dict], schema):
    import pyarrow as pa

    cols = {f.name: [r[f.name] for r in rows] for f in schema}
    cols["created_at"] = [int(t * 1e6) for t in cols["created_at"]]
    return pa.table(cols, schema=schema)
