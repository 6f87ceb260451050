"""Folder copies (`storage.copy_dir`) and recursive listings: several files at once, a failure reported only
once no other write is still landing (naming the file), a file too big for a server-side copy streamed once,
`file://` written as the plain path is, and a link looping back into a dataset folder listed once.
Overlap is proven with barriers and events on a wrapped source filesystem, never by timing."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import threading

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from diffray import storage
from diffray.data.folder import folder_rows


class Hooked(pafs.FileSystemHandler):
    """The local filesystem, calling `on_open(path)` before a file is opened for reading and `on_close(path)`
    after its input stream closes (copy_dir closes a file's output, which waits for the write, before that)."""

    def __init__(self, on_open=lambda path: None, on_close=lambda path: None, fs=None):
        self.fs, self.on_open, self.on_close = fs or pafs.LocalFileSystem(), on_open, on_close
        self.opened_out: list[str] = []

    def open_input_stream(self, path):
        self.on_open(path)
        return pa.PythonFile(_ClosingStream(self.fs.open_input_stream(path), lambda: self.on_close(path)), mode="r")

    def open_output_stream(self, path, metadata):
        self.opened_out.append(path)
        return self.fs.open_output_stream(path)

    def get_type_name(self):
        return "hooked"

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_file(self, path):
        self.on_open(path)
        return self.fs.open_input_file(path)

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


class _ClosingStream:
    """An input stream that reports its close."""

    def __init__(self, stream, on_close):
        self.stream, self.on_close = stream, on_close

    @property
    def closed(self):
        return self.stream.closed

    def readable(self):
        return True

    def read(self, n=-1):
        return self.stream.read(n)

    def close(self):
        if not self.stream.closed:
            self.stream.close()
            self.on_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _wrapped(handler: Hooked) -> pafs.FileSystem:
    return pafs.PyFileSystem(handler)


def _folder(root, files: dict[str, bytes]):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return str(root)


def test_two_files_are_copied_at_once(s3, tmp_path):
    """Each file's copy opens its source and waits at a two-party barrier: one copy at a time (object storage
    was copied file by file) never gets past it. Local copies too (pyarrow's copy_files was threaded there)."""
    src = _folder(tmp_path / "src", {"a.bin": b"a" * 100, "b.bin": b"b" * 200})
    meet = threading.Barrier(2, timeout=5)
    fs = _wrapped(Hooked(on_open=lambda path: meet.wait()))
    for dest, manifest in ((f"{s3.bucket('copy')}/art", [storage.MANIFEST]), (str(tmp_path / "art"), [])):
        assert storage.copy_dir(fs, src, dest) == dest
        dfs, dpath = storage.resolve(dest)
        listed = [posixpath.relpath(i.path, dpath) for i in storage.list_files(dfs, dpath, recursive=True)]
        assert listed == ["a.bin", "b.bin", *manifest]


def test_a_failing_file_is_reported_once_every_other_write_has_finished(s3, tmp_path):
    """The failing file waits until the three others are being copied, then fails; they are held until it has.
    When copy_dir raises, all three have been written and closed, the error names the file, and the folder
    that was there is as it was, with no hidden upload left beside it."""
    good = {f"{n}.bin": n.encode() * 1000 for n in "abd"}
    src = _folder(tmp_path / "src", {**good, "c.bin": b"never read"})
    dest = f"{s3.bucket('copy')}/art"
    storage.copy_dir(pafs.LocalFileSystem(), _folder(tmp_path / "old", {"old.bin": b"old"}), dest)
    before = {k: s3.fs.open_input_stream(k).read() for k in s3.keys(dest.rsplit("/", 1)[0])}
    all_open, failed, closed = threading.Barrier(4, timeout=5), threading.Event(), set()

    def on_open(path):
        all_open.wait()
        if path.endswith("c.bin"):
            failed.set()
            raise OSError(5, "Input/output error")
        assert failed.wait(timeout=5)

    fs = _wrapped(Hooked(on_open=on_open, on_close=lambda path: closed.add(os.path.basename(path))))
    with pytest.raises(OSError) as err:
        storage.copy_dir(fs, src, dest)
    assert closed == set(good), "every other file written and closed before the error"
    assert isinstance(err.value, storage.StorageError)
    assert str(err.value) == f"cannot copy {src}/c.bin to {dest}: [Errno 5] Input/output error"
    assert {k: s3.fs.open_input_stream(k).read() for k in s3.keys(dest.rsplit("/", 1)[0])} == before


def test_a_file_too_big_for_a_server_side_copy_is_streamed_once(s3, tmp_path, monkeypatch):
    """A file S3 cannot copy server-side went up twice: to the hidden upload, then from there into place."""
    monkeypatch.setattr(storage, "COPY_OBJECT_MAX", 1000)
    src = _folder(tmp_path / "src", {"big.bin": b"x" * 5000, "small.bin": b"y" * 10})
    dest = f"{s3.bucket('copy')}/art"
    resolve, outputs = storage.resolve, Hooked(fs=s3.fs, on_open=lambda path: pytest.fail(f"{path} read back"))
    monkeypatch.setattr(storage, "resolve", lambda p: (_wrapped(outputs), resolve(p)[1]) if str(p).startswith(
        "s3://") else resolve(p))
    storage.copy_dir(pafs.LocalFileSystem(), src, dest)
    big = [p for p in outputs.opened_out if p.endswith("big.bin")]
    assert big == [f"{dest[5:]}/big.bin"], "written once, straight into place"
    assert s3.fs.open_input_stream(f"{dest[5:]}/big.bin").read() == b"x" * 5000
    manifest = json.loads(s3.fs.open_input_stream(f"{dest[5:]}/{storage.MANIFEST}").read())
    assert manifest["files"] == {"big.bin": 5000, "small.bin": 10}

    # replacing a big file of the old folder: staged first, so a failed upload leaves the old folder whole
    (tmp_path / "src" / "big.bin").write_bytes(b"z" * 4000)
    outputs.on_open, outputs.opened_out = lambda path: None, []
    storage.copy_dir(pafs.LocalFileSystem(), src, dest)
    assert [p.split("/")[1].startswith(".art.upload-") for p in outputs.opened_out if p.endswith("big.bin")] == \
        [True, False]
    assert s3.fs.open_input_stream(f"{dest[5:]}/big.bin").read() == b"z" * 4000


def test_a_file_uri_is_written_as_the_plain_path_is(tmp_path):
    """`file://` went the object-storage way: each file uploaded aside, then copied again into the live folder
    after its manifest was removed (no empty folders). Now, as for the plain path, the new folder is assembled
    beside it and renamed into place (a new directory); only the manifest its readers (`RemoteRegistry`)
    need differs."""
    src = _folder(tmp_path / "src", {"w.bin": b"w", "sub/x.txt": b"x"})
    (tmp_path / "src" / "empty").mkdir()
    for name in ("plain", "uri"):
        dest = str(tmp_path / name) if name == "plain" else f"file://{tmp_path / name}"
        storage.copy_dir(pafs.LocalFileSystem(), _folder(tmp_path / "old", {"stale.bin": b"s"}), dest)
        before = os.stat(tmp_path / name).st_ino
        assert storage.copy_dir(pafs.LocalFileSystem(), src, dest) == dest
        assert os.stat(tmp_path / name).st_ino != before, "a new folder renamed into place"
    tree = {d: sorted(str(p.relative_to(tmp_path / d)) for p in (tmp_path / d).rglob("*")) for d in ("plain", "uri")}
    assert tree["plain"] == ["empty", "sub", "sub/x.txt", "w.bin"]
    assert tree["uri"] == sorted([*tree["plain"], storage.MANIFEST])
    manifest = json.loads((tmp_path / "uri" / storage.MANIFEST).read_bytes())
    assert manifest["files"] == {"sub/x.txt": 1, "w.bin": 1}
    assert sorted(os.listdir(tmp_path)) == ["old", "plain", "src", "uri"]
    assert storage.local_path(f"file://{tmp_path}/a%20b") == str(tmp_path / "a b") == storage.local_path(
        str(tmp_path / "a b"))
    assert storage.write_bytes(f"file://{tmp_path}/f.txt", b"1") == f"file://{tmp_path}/f.txt"


def test_a_local_copy_that_fails_leaves_the_folder_and_no_temporary_one(tmp_path):
    """The half-assembled `<dest>.tmp-*` folder was left beside the destination."""
    dest = tmp_path / "art"
    storage.copy_dir(pafs.LocalFileSystem(), _folder(tmp_path / "old", {"old.bin": b"old"}), str(dest))
    src = _folder(tmp_path / "new", {"a.bin": b"a"})
    (tmp_path / "new" / "zz-unreadable.bin").symlink_to("/proc/self/mem")  # reading it fails (EIO)
    with pytest.raises(storage.StorageError, match=r"^cannot copy .*/new/zz-unreadable.bin to .*/art: "):
        storage.copy_dir(pafs.LocalFileSystem(), src, str(dest))
    assert sorted(os.listdir(tmp_path)) == ["art", "new", "old"] and os.listdir(dest) == ["old.bin"]


@pytest.mark.parametrize("link", ["up", "out"])
def test_a_link_looping_back_into_a_dataset_folder_is_listed_once_with_a_warning(link, tmp_path, caplog):
    """pyarrow followed `sub/up -> ..` (or a link to the folder holding the dataset) into the folder again until
    the OS's link limit: one such link listed every name 40 times, two 2**40 times (a hang)."""
    root = tmp_path / "data"
    _folder(root, {"a.png": b"png", "sub/b.png": b"png",
                   "metadata.jsonl": json.dumps({"file_name": "a.png", "text": "cat"}).encode()})
    os.symlink(".." if link == "up" else tmp_path, root / "sub" / link)
    with caplog.at_level(logging.WARNING, logger="diffray.storage"):
        listed = storage.list_files(pafs.LocalFileSystem(), str(root), recursive=True)
        _, _, rows = folder_rows(str(root))
    assert [os.path.relpath(i.path, root) for i in listed] == ["a.png", "metadata.jsonl", "sub/b.png"]
    assert [(r["source"], r["error"]) for r in rows] == [("a.png", "")]
    warning = f"{root}/sub/{link}: not listed, a link to {root if link == 'up' else tmp_path}, a folder it is inside of"
    assert caplog.messages == [f"{warning} (a loop)"] * 2


def test_a_missing_source_folder_leaves_the_destination_as_it_was(s3, tmp_path):
    """Object storage: the copy listed no file, removed every file of the folder it replaced and wrote an empty
    manifest in its place."""
    old = _folder(tmp_path / "old", {"weights.bin": b"w" * 100})
    for dest in (f"{s3.bucket('copy')}/art", str(tmp_path / "art")):
        storage.copy_dir(pafs.LocalFileSystem(), old, dest)
        dfs, dpath = storage.resolve(dest)
        before = {i.path: dfs.open_input_stream(i.path).read() for i in storage.list_files(dfs, dpath, recursive=True)}
        with pytest.raises(storage.StorageError) as err:
            storage.copy_dir(pafs.LocalFileSystem(), str(tmp_path / "gone"), dest)
        assert str(err.value) == f"cannot copy {tmp_path / 'gone'} to {dest}: no such folder"
        assert {i.path: dfs.open_input_stream(i.path).read()
                for i in storage.list_files(dfs, dpath, recursive=True)} == before
