"""One set of rules for "a local path or a URI" (s3://, gs://, file://, ...), on pyarrow filesystems.

Every place that stores or reads run data (checkpoints' artifacts, Tune results, datasets, caches, logs)
goes through here: `is_uri` decides, `resolve` gives the (filesystem, path) pair, and the helpers read,
write (atomically on local disk), list, copy folders and name the local log folder of a URI run.
Local paths come back absolute, so Ray workers whose cwd differs from the driver's find them.

This module must never import Ray, torch or anything heavier than pyarrow.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import shutil
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from diffray.errors import StorageError

MANIFEST = "diffray_manifest.json"  # written last into a folder copied to object storage: its files and sizes
LOCAL_LOGS = "runs-logs"  # a URI run writes its logs under ./runs-logs/<name> and uploads them beside the run
COPY_THREADS = 8  # files of a folder copied at once: one S3 stream is far slower than the link it runs on
log = logging.getLogger(__name__)


class CopyError(StorageError, OSError):
    """A file of a folder copy failed. Also an OSError, like the I/O error it wraps, for callers that catch those."""


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


def local_path(path: str | Path) -> str | None:
    """The absolute local path of a plain path or a `file://` (`local://`) URI: the same folder, written the same
    way (atomic renames, no staging); None for any other URI.

    Raises:
        StorageError: as `absolute` and `resolve` (`file:/x`, `file://host/x`).
    """
    if not str(path).startswith(("file://", "local://")):
        return None if is_uri(path) else absolute(path)
    return resolve(path)[1]


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
    """The files (not folders) under `root`, sorted by path; recursively, links back into a folder they are in
    are skipped (`walk`)."""
    infos = walk(fs, root) if recursive else fs.get_file_info(pafs.FileSelector(root))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def walk(fs: pafs.FileSystem, root: str, allow_not_found: bool = False) -> list[pafs.FileInfo]:
    """Everything under `root`, as `FileSelector(root, recursive=True)` lists it, except on local disk a link to
    a folder the link is inside of (`root` or above), which is skipped with a warning naming it. pyarrow follows
    links to folders, so one such link (`sub/up -> ..`) lists the folder again under ever longer names until the
    OS's limit of 40 links (ELOOP), and two list it 2**40 times. Skipped, not refused: all the link holds is
    listed already, under its real path, and a `latest -> .` left in a dataset folder is harmless otherwise."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=allow_not_found))
    real_root = os.path.realpath(root)  # and the folders it is in: a link to one of those leads back into it
    infos, todo = [], [(root, (real_root, *map(str, Path(real_root).parents)))]
    while todo:
        folder, above = todo.pop()
        for info in fs.get_file_info(pafs.FileSelector(folder, allow_not_found=allow_not_found)):
            if info.type == pafs.FileType.Directory:
                real = os.path.realpath(info.path)
                if real in above:
                    log.warning("%s: not listed, a link to %s, a folder it is inside of (a loop)", info.path, real)
                    continue
                todo.append((info.path, (*above, real)))
            infos.append(info)
    return infos


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
    """Write a file, creating its folder; on local disk (`file://` too) atomically (a temp sibling renamed into
    place). Returns `path`; a local path made absolute."""
    local = local_path(path)
    if local is None:
        fs, p = resolve(path)
        fs.create_dir(posixpath.dirname(p), recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(data)
        return str(path)
    target = Path(local)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return str(path) if is_uri(path) else local


def write_text(path: str | Path, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def copy_dir(fs: pafs.FileSystem, src: str, dest: str) -> str:
    """Copy the folder `src` (on `fs`) to `dest` (a local path or URI), replacing what is there; a few files at
    a time (`COPY_THREADS`), each streamed once.

    On local disk the new folder is assembled beside `dest` and swapped in with renames, so a reader sees the
    old folder or the new one, never half of one. A `file://` URI is the same local folder and is written the
    same way, except that like any URI it gets a manifest (written before the swap): its readers treat it as
    object storage (`RemoteRegistry`). On object storage see `_replace_remote`. Either way a copy that fails
    returns only once no file is being written any more.

    Returns:
        `dest`; a local path made absolute.

    Raises:
        CopyError: a file could not be copied (naming the first one); the folder at `dest` is as it was.
        StorageError: `src` is no folder (the folder at `dest` is as it was: on object storage an empty copy
            would have replaced it), or the copy is in place but files of the folder it replaced could not be
            removed.
    """
    if fs.get_file_info(src).type != pafs.FileType.Directory:
        raise StorageError(f"cannot copy {src} to {dest}: no such folder")
    local = local_path(dest)
    if local is None:
        _replace_remote(fs, src, dest)
        return dest
    tmp, old = f"{local}.tmp-{uuid.uuid4().hex[:8]}", f"{local}.old-{uuid.uuid4().hex[:8]}"
    infos, lfs = walk(fs, src), pafs.LocalFileSystem()
    sizes = {posixpath.relpath(i.path, src): i.size for i in infos if i.type == pafs.FileType.File}
    if is_uri(dest):
        sizes.pop(MANIFEST, None)  # a copied folder's own manifest: a new one is written below
    try:
        Path(tmp).mkdir(parents=True)
        for d in (i for i in infos if i.type == pafs.FileType.Directory):  # empty ones too
            Path(tmp, posixpath.relpath(d.path, src)).mkdir(parents=True, exist_ok=True)
        _copy_all(src, dest, [(rel, _streamer(fs, f"{src}/{rel}", lfs, f"{tmp}/{rel}")) for rel in sorted(sizes)])
        if is_uri(dest):
            write_manifest(lfs, tmp, sizes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if Path(local).exists():
        os.replace(local, old)
    os.replace(tmp, local)
    shutil.rmtree(old, ignore_errors=True)
    return dest if is_uri(dest) else local


COPY_OBJECT_MAX = 5 * 2**30  # S3's limit for one server-side copy


def _replace_remote(fs: pafs.FileSystem, src: str, dest: str) -> None:
    """Object storage has no rename, and readers count a folder only once its manifest agrees (`incomplete`).
    So the files are uploaded first beside `dest` under a hidden name (`.<name>.upload-*`): an upload that
    fails or is killed leaves the folder at `dest` as it was. Then they are copied into place server-side (no
    data through this process), the manifest naming them is written, and the files of the replaced folder the
    new one lacks are removed. The replaced folder's manifest goes before the first copy: during those copies
    (a request per file) a reader finds no whole folder rather than old and new files taken for one.

    A file of `COPY_OBJECT_MAX` or more cannot be copied server-side: when the replaced folder has no file of its
    name it is uploaded straight into place (its old manifest does not name it, so that folder stays whole, and a
    failed upload removes it again); only one that replaces a file of the old folder is staged and then streamed
    once more, as the old file must stay until the manifest goes."""
    dfs, dpath = resolve(dest)
    parent, name = posixpath.split(dpath)
    stage = f"{parent}/.{name}.upload-{uuid.uuid4().hex[:8]}"
    sizes = _files(fs, src)
    sizes.pop(MANIFEST, None)  # a copied folder's own manifest: a new one is written below
    old = _files(dfs, dpath)
    direct = {rel for rel, size in sizes.items() if size >= COPY_OBJECT_MAX and rel not in old}
    try:
        _copy_all(src, dest, [(rel, _streamer(fs, f"{src}/{rel}", dfs, f"{dpath if rel in direct else stage}/{rel}"))
                              for rel in sorted(sizes)])
        if MANIFEST in old:
            dfs.delete_file(f"{dpath}/{MANIFEST}")
        _copy_all(stage, dest, [(rel, _server_copy(dfs, f"{stage}/{rel}", f"{dpath}/{rel}", sizes[rel]))
                                for rel in sorted(set(sizes) - direct)])
        write_manifest(dfs, dpath, sizes)
    except BaseException:
        for rel in direct:
            _delete_quietly(dfs, f"{dpath}/{rel}")
        raise
    finally:
        _delete_quietly(dfs, stage, folder=True)  # never uploaded, or unreachable: a hidden leftover no reader lists
    failed = []
    for rel in sorted(set(old) - set(sizes) - {MANIFEST}):
        try:
            dfs.delete_file(f"{dpath}/{rel}")
        except (OSError, pa.ArrowException) as exc:
            failed.append(f"{rel} ({_first_line(exc)})")
    if failed:
        raise StorageError(f"{dest}: copied whole, but {len(failed)} file(s) of the folder it replaced cannot be "
                           f"removed: {failed[0]}; remove them by hand")


def _copy_all(src: str, dest: str, copies: list[tuple[str, Callable[[], None]]]) -> None:
    """Run `copies` ((relative name, copy)) on up to `COPY_THREADS` threads; once one fails, those not started
    are skipped. Returns, or raises, only when no copy is running: S3 writes end when their stream closes, and
    one landing after the caller cleaned up would be left behind.

    Raises:
        CopyError: naming the first file (in `copies` order) that could not be copied from `src` to `dest`.
    """
    failed = threading.Event()

    def run(copy: Callable[[], None]) -> BaseException | None:
        if failed.is_set():
            return None
        try:
            copy()
        except (OSError, pa.ArrowException) as exc:
            failed.set()
            return exc
        return None

    if not copies:
        return
    with ThreadPoolExecutor(min(COPY_THREADS, len(copies)), thread_name_prefix="diffray-copy") as pool:
        errors = list(pool.map(run, [copy for _, copy in copies]))
    bad = [(rel, exc) for (rel, _), exc in zip(copies, errors) if exc is not None]
    if bad:
        more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
        raise CopyError(f"cannot copy {src}/{bad[0][0]} to {dest}: {_first_line(bad[0][1])}{more}") from bad[0][1]


def _files(fs: pafs.FileSystem, root: str) -> dict[str, int]:
    """Every file under `root` (relative path -> bytes); none when there is no `root`."""
    infos = walk(fs, root, allow_not_found=True)
    return {posixpath.relpath(i.path, root): i.size for i in infos if i.type == pafs.FileType.File}


def _streamer(fs: pafs.FileSystem, src: str, dfs: pafs.FileSystem, dest: str) -> Callable[[], None]:
    """A copy of one file, streamed in chunks (on S3 a multipart upload); closing the output waits until it is
    written."""
    def copy() -> None:
        if isinstance(dfs, pafs.LocalFileSystem):
            dfs.create_dir(posixpath.dirname(dest), recursive=True)
        with fs.open_input_stream(src) as f, dfs.open_output_stream(dest) as out:
            shutil.copyfileobj(f, out, 8 << 20)
    return copy


def _server_copy(fs: pafs.FileSystem, src: str, dest: str, size: int) -> Callable[[], None]:
    """A copy of one file within `fs`: server-side on object storage, streamed when too big for that."""
    return (lambda: fs.copy_file(src, dest)) if size < COPY_OBJECT_MAX else _streamer(fs, src, fs, dest)


def _delete_quietly(fs: pafs.FileSystem, path: str, folder: bool = False) -> None:
    try:
        fs.delete_dir(path) if folder else fs.delete_file(path)
    except (OSError, pa.ArrowException):
        pass


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def upload_dir(local: str | Path, dest: str) -> None:
    """Copy every file under the local folder `local` to the URI `dest`, replacing same-named files (logs a
    node writes locally, kept beside a run on object storage). A missing folder copies nothing.

    Raises:
        CopyError: naming the first file that could not be copied, once no copy is running any more."""
    if not Path(local).is_dir():
        return
    (dfs, dpath), lfs, src = resolve(dest), pafs.LocalFileSystem(), str(Path(local).resolve())
    names = sorted(posixpath.relpath(i.path, src) for i in walk(lfs, src) if i.type == pafs.FileType.File)
    _copy_all(src, dest, [(rel, _streamer(lfs, f"{src}/{rel}", dfs, f"{dpath}/{rel}")) for rel in names])


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
