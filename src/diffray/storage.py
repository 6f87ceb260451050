"""One set of rules for "a local path or a URI" (s3://, gs://, file://, ...), on pyarrow filesystems.

Every place that stores or reads run data (checkpoints' artifacts, Tune results, datasets, caches, logs)
goes through here: `is_uri` decides, `resolve` gives the (filesystem, path) pair, and the helpers read,
write (atomically on local disk), list, copy folders and name the local log folder of a URI run.
Local paths come back absolute, so Ray workers whose cwd differs from the driver's find them.

This module must never import Ray, torch or anything heavier than pyarrow.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from diffray.errors import StorageError

MANIFEST = "diffray_manifest.json"  # written last into a folder copied to object storage: its files and sizes
LOCAL_LOGS = "runs-logs"  # a URI run writes its logs under ./runs-logs/<name> and uploads them beside the run


def is_uri(path: str | Path) -> bool:
    """True for `scheme://...` (object stores, `file://`), False for a local path."""
    return "://" in str(path)


def absolute(path: str | Path) -> str:
    """A URI unchanged; a local path expanded and made absolute (against the current directory).

    Raises:
        StorageError: a local path that reads as a URI missing a slash (`s3:/bucket/runs`), which would
            otherwise become a folder named `s3:` here.
    """
    if is_uri(path):
        return str(path)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/", str(path)):
        scheme, rest = str(path).split(":", 1)
        raise StorageError(f"{path}: a URI needs two slashes after its scheme ({scheme}://{rest.lstrip('/')})")
    return str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a URI or a local path (forward slashes, no doubled separators)."""
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])


def resolve(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it (absolute for local paths).

    Raises:
        StorageError: an unknown scheme, a filesystem pyarrow was not built with, or bad credentials.
    """
    if not is_uri(path):
        return pafs.LocalFileSystem(), absolute(path)
    try:
        fs, inner = pafs.FileSystem.from_uri(str(path))
    except (pa.ArrowException, ValueError, OSError) as exc:  # OSError: e.g. hdfs:// without a JVM
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StorageError(f"{path}: cannot open URI ({first})") from None
    return fs, inner.rstrip("/") or inner


def file_type(path: str | Path) -> pafs.FileType:
    fs, p = resolve(path)
    return fs.get_file_info(p).type


def exists(path: str | Path) -> bool:
    return file_type(path) != pafs.FileType.NotFound


def is_dir(path: str | Path) -> bool:
    return file_type(path) == pafs.FileType.Directory


def first_missing(path: str | Path) -> Path | None:
    """The outermost folder of the local `path` that does not exist yet (`path` itself at most): what to remove
    to undo `mkdir(parents=True)`; None when `path` exists."""
    path = Path(path)
    return next((p for p in reversed([path, *path.parents]) if not p.exists()), None)


def nearest_existing_above(path: str | Path) -> Path:
    """The nearest existing folder (or file in the way) above the local `path`: where writing `path` creates the
    rest."""
    return next(p for p in Path(path).absolute().parents if p.exists())


def list_files(fs: pafs.FileSystem, root: str, recursive: bool = False) -> list[pafs.FileInfo]:
    """The files (not folders) under `root`, sorted by path."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=recursive))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def read_or_none(fs: pafs.FileSystem, path: str) -> bytes | None:
    """A file's bytes, or None when it does not exist or cannot be read (callers report it)."""
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, pa.ArrowException):
        return None


def read_text(path: str | Path) -> str:
    """A whole text file. Raises StorageError naming the path when it cannot be read."""
    fs, p = resolve(path)
    data = read_or_none(fs, p)
    if data is None:
        raise StorageError(f"{path}: cannot read file")
    return data.decode("utf-8")


def write_bytes(path: str | Path, data: bytes) -> str:
    """Write a file, creating its folder; on local disk atomically (a temp sibling renamed into place)."""
    if is_uri(path):
        fs, p = resolve(path)
        fs.create_dir(posixpath.dirname(p), recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(data)
        return str(path)
    target = Path(absolute(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return str(target)


def write_text(path: str | Path, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def copy_dir(fs: pafs.FileSystem, src: str, dest: str) -> str:
    """Copy the folder `src` (on `fs`) to `dest` (a local path or URI), replacing what is there.

    On local disk the new folder is assembled beside `dest` and swapped in with renames, so a reader
    sees the old folder or the new one, never half of one. On object storage see `_replace_remote`.

    Raises:
        StorageError: the copy is in place but files of the folder it replaced could not be removed.
    """
    if is_uri(dest):
        _replace_remote(fs, src, dest)
        return dest
    dest = absolute(dest)
    tmp, old = f"{dest}.tmp-{uuid.uuid4().hex[:8]}", f"{dest}.old-{uuid.uuid4().hex[:8]}"
    Path(tmp).mkdir(parents=True)
    pafs.copy_files(src, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    if Path(dest).exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


COPY_OBJECT_MAX = 5 * 2**30  # S3's limit for one server-side copy; a bigger file is streamed through this process


def _replace_remote(fs: pafs.FileSystem, src: str, dest: str) -> None:
    """Object storage has no rename, and readers count a folder only once its manifest agrees (`incomplete`).
    So the files are uploaded first beside `dest` under a hidden name (`.<name>.upload-*`): an upload that
    fails or is killed leaves the folder at `dest` as it was. Then they are copied into place server-side (no
    data through this process), the manifest naming them is written, and the files of the replaced folder the
    new one lacks are removed. The replaced folder's manifest goes before the first copy: during those copies
    (a request per file) a reader finds no whole folder rather than old and new files taken for one."""
    dfs, dpath = resolve(dest)
    parent, name = posixpath.split(dpath)
    stage = f"{parent}/.{name}.upload-{uuid.uuid4().hex[:8]}"
    try:
        # file by file, not pafs.copy_files: when one file fails that returns while others are still being
        # written (S3's background writes), and they would land after the hidden copy is removed below
        for rel in _files(fs, src):
            _stream(fs, f"{src}/{rel}", dfs, f"{stage}/{rel}")
        new = _files(dfs, stage)
        new.pop(MANIFEST, None)  # a copied folder's own manifest: a new one is written below
        old = _files(dfs, dpath)
        if MANIFEST in old:
            dfs.delete_file(f"{dpath}/{MANIFEST}")
        for rel, size in sorted(new.items()):
            if size < COPY_OBJECT_MAX and not isinstance(dfs, pafs.LocalFileSystem):
                dfs.copy_file(f"{stage}/{rel}", f"{dpath}/{rel}")
            else:  # file://: its folders are made first
                _stream(dfs, f"{stage}/{rel}", dfs, f"{dpath}/{rel}")
        if isinstance(dfs, pafs.LocalFileSystem):  # an empty folder copied still gets its manifest
            dfs.create_dir(dpath, recursive=True)
        write_manifest(dfs, dpath, new)
    finally:
        try:
            dfs.delete_dir(stage)
        except (OSError, pa.ArrowException):
            pass  # never uploaded, or unreachable: a hidden leftover no reader lists
    failed = []
    for rel in sorted(set(old) - set(new) - {MANIFEST}):
        try:
            dfs.delete_file(f"{dpath}/{rel}")
        except (OSError, pa.ArrowException) as exc:
            failed.append(f"{rel} ({(str(exc).strip().splitlines() or [type(exc).__name__])[0]})")
    if failed:
        raise StorageError(f"{dest}: copied whole, but {len(failed)} file(s) of the folder it replaced cannot be "
                           f"removed: {failed[0]}; remove them by hand")


def _files(fs: pafs.FileSystem, root: str) -> dict[str, int]:
    """Every file under `root` (relative path -> bytes); none when there is no `root`."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {posixpath.relpath(i.path, root): i.size for i in infos if i.type == pafs.FileType.File}


def _stream(fs: pafs.FileSystem, src: str, dfs: pafs.FileSystem, dest: str) -> None:
    """Copy one file; closing the output waits until it is written (S3 too)."""
    if isinstance(dfs, pafs.LocalFileSystem):
        dfs.create_dir(posixpath.dirname(dest), recursive=True)
    with fs.open_input_stream(src) as f, dfs.open_output_stream(dest) as out:
        shutil.copyfileobj(f, out, 1 << 20)


def upload_dir(local: str | Path, dest: str) -> None:
    """Copy every file under the local folder `local` to the URI `dest`, replacing same-named files (logs a
    node writes locally, kept beside a run on object storage). A missing folder copies nothing."""
    if not Path(local).is_dir():
        return
    dfs, dpath = resolve(dest)
    pafs.copy_files(str(Path(local).resolve()), dpath, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dfs)


def write_manifest(fs: pafs.FileSystem, root: str, files: dict[str, int] | None = None) -> dict[str, int]:
    """Write `root/MANIFEST` listing `files` (relative path -> bytes; default: every other file under `root`);
    call it after the last file is written. Readers on object storage treat a folder as whole only when its
    manifest agrees (`incomplete`)."""
    if files is None:
        files = {posixpath.relpath(i.path, root): i.size for i in list_files(fs, root, recursive=True)}
        files.pop(MANIFEST, None)
    with fs.open_output_stream(f"{root}/{MANIFEST}") as f:
        f.write(json.dumps({"files": files}, sort_keys=True).encode())
    return files


def incomplete(manifest: bytes | None, sizes: dict[str, int]) -> str | None:
    """Why a folder whose files have `sizes` (relative path -> bytes) is not whole by its manifest's bytes
    (None when it is): no manifest yet, an unreadable one, or a file it names missing or of another size."""
    if manifest is None:
        return f"no {MANIFEST} yet (an upload in progress, or one that did not finish with it)"
    try:
        files = json.loads(manifest.decode("utf-8"))["files"]
        wanted = {str(k): int(v) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError):  # 1e400; "[" * 10**5
        return f"{MANIFEST} is not a JSON object with a files map"
    missing = sorted(k for k, v in wanted.items() if sizes.get(k) != v)
    return f"{len(missing)} file(s) missing or of another size than {MANIFEST} says: {missing[:3]}" if missing else None


def local_dir(base: str, *parts: str) -> str:
    """Where the local files of something stored at `base` go (logs, reports): beside it on local disk,
    else under `./runs-logs/<last part of base>/` (logs are written with plain file I/O)."""
    root = Path(absolute(base)) if not is_uri(base) else Path.cwd() / LOCAL_LOGS / posixpath.basename(base.rstrip("/"))
    return str(root.joinpath(*parts))
