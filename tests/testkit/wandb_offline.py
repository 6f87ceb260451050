"""Read back a W&B offline run (`offline-run-*/run-<id>.wandb`) without network or an account.

wandb 0.31 writes its run file from the Go core and ships no Python reader, so this reads the container
(a LevelDB-style log: a 7-byte `:W&B` header, then 32 KiB blocks of records, each with a 7-byte header:
crc, length, kind) and decodes every record with wandb's own protobuf `Record` type.
"""

from __future__ import annotations

import json
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    """Every `wandb_internal_pb2.Record` in the run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def run_file(wandb_dir: str | Path, timeout: float = 60) -> Path:
    """The one offline run file under `wandb_dir` (the `dir` given to wandb: it adds `wandb/`), once it
    holds the run's `exit` record: `run.finish()` can return while wandb's core process is still writing
    the file (seen on a loaded machine: a file without its history rows yet)."""
    files = sorted(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline run under {wandb_dir}, found {files}"
    return finished(files[0], timeout)


def finished(path: Path, timeout: float = 60) -> Path:
    """`path` once it holds its run's `exit` record (wandb's core process may still be writing it)."""
    from testkit.wait import wait_until

    wait_until(lambda: _complete(path), f"{path}: the run's exit record", timeout=timeout)
    return path


def _complete(path: Path) -> bool:
    try:
        return any(r.WhichOneof("record_type") == "exit" for r in records(path))
    except Exception:  # noqa: BLE001 - a record still being written does not parse yet
        return False


def history(path: str | Path) -> list[dict]:
    """Every logged history row as {key: value} (`_step` included), in order."""
    rows = []
    for r in records(path):
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item})
    return rows


def config(path: str | Path) -> dict:
    """The run's config as the last config record leaves it (top-level keys)."""
    out: dict = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        items = r.config.update if kind == "config" else r.run.config.update if kind == "run" else []
        out.update({item.key: json.loads(item.value_json) for item in items if item.key})
    return out
