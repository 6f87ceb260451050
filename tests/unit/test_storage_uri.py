"""Storage helpers against the session's S3 endpoint on 127.0.0.1: a run's local logs uploaded beside it on
object storage (replaced on each upload, a failed upload only logged); a folder copied over another one there
(an artifact exported again) leaves the old one whole when the copy fails, and only the new files when it works."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from diffray import storage
from diffray.trainers.loop import upload_logs


def test_logs_are_uploaded_beside_the_run_and_replaced_on_each_upload(s3, tmp_path):
    logs = tmp_path / "runs-logs" / "r" / "logs"
    (logs / "tb").mkdir(parents=True)
    (logs / "metrics.jsonl").write_text('{"step": 1}\n')
    (logs / "tb" / "events").write_bytes(b"\x00\x01")
    dest = f"{s3.bucket('runs')}/r/logs"
    upload_logs(str(logs), dest)
    assert s3.keys(dest) == [f"{dest[5:]}/metrics.jsonl", f"{dest[5:]}/tb/events"]
    (logs / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')  # appended since: the newer file wins
    upload_logs(str(logs), dest)
    assert s3.fs.open_input_stream(f"{dest[5:]}/metrics.jsonl").read() == b'{"step": 1}\n{"step": 2}\n'
    storage.upload_dir(tmp_path / "nothing-here", dest)  # no logs yet on this node: nothing to copy, no error
    assert len(s3.keys(dest)) == 2


def test_a_failed_upload_is_logged_and_training_goes_on(s3, tmp_path, caplog):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "metrics.jsonl").write_text("{}\n")
    with caplog.at_level(logging.WARNING, logger="diffray.trainers.loop"):
        upload_logs(str(logs), "s3://no-such-bucket-here/r/logs")
    assert "logs not uploaded to s3://no-such-bucket-here/r/logs" in caplog.text and str(logs) in caplog.text


def test_a_file_that_cannot_be_uploaded_is_named_after_the_other_files_are_written(tmp_path, caplog):
    """One log file's destination has a file where its folder should be: the error names that file (pyarrow's
    copy_files raised its own message on the first failure, whatever else was still being written; that the
    error waits for the other writes is `test_storage_copy.py`'s, with barriers), and the upload of the rest
    works once the file is out of the way."""
    logs, dest = tmp_path / "logs", tmp_path / "store" / "logs"
    for name in ("a.jsonl", "tb/events", "z.jsonl"):
        (logs / name).parent.mkdir(parents=True, exist_ok=True)
        (logs / name).write_text(name)
    dest.mkdir(parents=True)
    (dest / "tb").write_text("a file in the way")
    with pytest.raises(storage.CopyError) as err:
        storage.upload_dir(logs, dest.as_uri())
    assert str(err.value).startswith(f"cannot copy {logs}/tb/events to {dest.as_uri()}: ")
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING, logger="diffray.trainers.loop"):
        upload_logs(str(logs), dest.as_uri())
    assert f"cannot copy {logs}/tb/events" in caplog.text
    (dest / "tb").unlink()
    storage.upload_dir(logs, dest.as_uri())
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == ["a.jsonl", "tb/events",
                                                                                         "z.jsonl"]


def test_a_uri_missing_a_slash_or_a_filesystem_that_cannot_start_is_one_clear_error(tmp_path, monkeypatch):
    import pytest

    from diffray.errors import StorageError

    with pytest.raises(StorageError, match=r"^s3:/my-bucket/runs: a URI needs two slashes after its scheme "
                                           r"\(s3://my-bucket/runs\)$"):
        storage.resolve("s3:/my-bucket/runs")
    monkeypatch.chdir(tmp_path)
    assert not list(tmp_path.iterdir())  # no folder named `s3:` made here
    assert storage.absolute("C:/data") == str(tmp_path / "C:" / "data")  # a one-letter name is a path
    with pytest.raises(StorageError) as err:  # pyarrow's HDFS needs a JVM: its long OSError, one line
        storage.resolve("hdfs://namenode:8020/runs")
    assert str(err.value).startswith("hdfs://namenode:8020/runs: cannot open URI (") and "\n" not in str(err.value)


def test_a_folder_copied_over_another_on_object_storage_leaves_it_whole_until_the_copy_is(s3, tmp_path):
    """The copy went straight into the old folder: a source file that could not be read left the old folder with
    an empty object of that name (and some new files beside the old manifest); a copy that worked kept the old
    folder's other files, and its manifest named them too."""
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, weights in ((old, b"old weights"), (new, b"new weights")):
        folder.mkdir()
        (folder / "weights.bin").write_bytes(weights)
        (folder / "card.json").write_text(json.dumps({"from": folder.name}))
    (old / "only-old.txt").write_text("stale once replaced")
    dest = f"{s3.bucket('artifacts')}/run/artifact"
    storage.copy_dir(pafs.LocalFileSystem(), str(old), dest)
    before = {k: s3.fs.open_input_stream(k).read() for k in s3.keys(dest.rsplit("/", 2)[0])}

    (new / "zz-unreadable.bin").symlink_to("/proc/self/mem")  # reading it fails (EIO) once the copy reaches it
    with pytest.raises((OSError, pa.ArrowException)):
        storage.copy_dir(pafs.LocalFileSystem(), str(new), dest)
    after = {k: s3.fs.open_input_stream(k).read() for k in s3.keys(dest.rsplit("/", 2)[0])}
    assert after == before, "the old folder as it was, and no hidden upload left beside it"

    (new / "zz-unreadable.bin").unlink()
    assert storage.copy_dir(pafs.LocalFileSystem(), str(new), dest) == dest
    assert s3.keys(dest.rsplit("/", 2)[0]) == [f"{dest[5:]}/{n}" for n in ("card.json", storage.MANIFEST,
                                                                           "weights.bin")]
    manifest = s3.fs.open_input_stream(f"{dest[5:]}/{storage.MANIFEST}").read()
    assert json.loads(manifest)["files"] == {"card.json": (new / "card.json").stat().st_size, "weights.bin": 11}
    assert storage.incomplete(manifest, {"card.json": (new / "card.json").stat().st_size, "weights.bin": 11}) is None
    assert s3.fs.open_input_stream(f"{dest[5:]}/weights.bin").read() == b"new weights"
