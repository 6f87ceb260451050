"""Checkpoint save + report + restore on the workers, and the check that a checkpoint is whole.

A checkpoint Ray registered can still be damaged when it is read back: a node that lost power before its
page cache reached the disk leaves zero-byte or truncated files, a person deletes a file, a copy stops
half-way. Resuming from it would fail the same way on every rerun while older intact checkpoints sit
beside it, so `restore` takes the newest checkpoint that passes `problem` (every file the ranks wrote,
listed with its size in `trainer_state.json`, which is written last) and says which ones it skipped.
A checkpoint that runs out of disk space while written names the folder and the space, and leaves no
half-written folder in the run. Runs on Ray Train workers only, but for `repair_snapshot` (the driver,
before Ray starts: Ray's own list of the run's checkpoints); `problem` is pure (files only).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import struct
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train

try:  # Ray Train v2's own reader of its run snapshot: what it accepts is what `repair_snapshot` must write (2.60)
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as SNAPSHOT
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState
except ImportError:  # another Ray in the supported range: its snapshot is left to Ray, unchecked
    SNAPSHOT, _CheckpointManagerState = "checkpoint_manager_snapshot.json", None

from diffray import storage
from diffray.errors import TrainingError
from diffray.trainers import hooks
from diffray.trainers.session import (ARTIFACT_DIR, STATE_FILE, WorkerEnv, broadcast_from_main, gather_objects,
                                      summary_metrics)

log = logging.getLogger(__name__)
FILES = "files"  # trainer_state.json's list of [relative path, size] of every file of the checkpoint


def listing(root: Path) -> list[list]:
    """[relative path, size] of every file under `root`."""
    return sorted([p.relative_to(root).as_posix(), p.stat().st_size] for p in root.rglob("*") if p.is_file())


def format_problem(path: Path) -> str | None:
    """Why a file of a known format cannot be read back whole (None: it can, or the format is not checked):
    zero bytes, a truncated safetensors file, or a torch `.pt` zip archive without its central directory."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if path.suffix == ".safetensors":
        with path.open("rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
            try:
                header = json.loads(f.read(n)) if n < size else None
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, AttributeError):
                return "is not a whole safetensors file"
        return None if 8 + n + end == size else f"is truncated ({size} bytes, its header says {8 + n + end})"
    if path.suffix == ".pt" and not zipfile.is_zipfile(path):
        return "is truncated or not a torch checkpoint"
    return None


def problem(ckpt_dir: Path) -> str | None:
    """What makes the checkpoint in `ckpt_dir` unusable, naming the file; None when it is whole."""
    state_file = ckpt_dir / STATE_FILE
    if not state_file.is_file():
        return f"{STATE_FILE} is missing"
    try:
        state = json.loads(state_file.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{STATE_FILE} is not valid JSON"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} holds no step"
    for name, size in state.get(FILES, []):  # checkpoints written before the list only get the format checks
        path = ckpt_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    for path in sorted(p for p in ckpt_dir.rglob("*") if p.is_file() and p.name != STATE_FILE):
        why = format_problem(path)
        if why:
            return f"{path.relative_to(ckpt_dir).as_posix()} {why}"
    return None


def candidates(latest: ray.train.Checkpoint) -> list[ray.train.Checkpoint]:
    """The latest registered checkpoint, then the run's older checkpoint dirs, newest first (Ray names them
    `checkpoint_<timestamp>`; a dir named after the latest is one it never registered)."""
    fs, path = latest.filesystem, latest.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    infos = fs.get_file_info(pafs.FileSelector(parent))
    older = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [latest] + [ray.train.Checkpoint(f"{parent}/{n}", filesystem=fs) for n in older]


def pick(latest: ray.train.Checkpoint) -> tuple[str, list[str]]:
    """(path of the newest whole checkpoint, what was wrong with each newer one); rank 0 reads them.

    Raises:
        TrainingError: no checkpoint of the run is whole (naming the latest and what is wrong with it).
    """
    skipped = []
    for ckpt in candidates(latest):
        with ckpt.as_directory() as d:
            why = problem(Path(d))
        if why is None:
            return ckpt.path, skipped
        skipped.append(f"{ckpt.path}: {why}")
    raise TrainingError(f"no intact checkpoint to resume from: {'; '.join(skipped)}. Restore the files, or give a "
                        "new run.name to train from the start")


def restore(engine, env: WorkerEnv, status=None) -> dict[str, Any] | None:
    """Load the newest intact checkpoint of the run into `engine` (all ranks); returns its trainer state or None.
    Damaged newer ones are logged and reported to the driver's `status` actor ("skipped_checkpoints")."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return None
    chosen, skipped = broadcast_from_main(pick(latest) if env.is_main else None)
    if skipped:
        log.warning("resuming from %s; skipped damaged checkpoints: %s", chosen, "; ".join(skipped))
        if env.is_main and status is not None:
            ray.get(status.set.remote("skipped_checkpoints", skipped))
    with ray.train.Checkpoint(chosen, filesystem=latest.filesystem).as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        state.pop(FILES, None)
        engine.load(Path(d))
        engine.load_ema(Path(d))
    return state


def repair_snapshot(run_dir: str) -> None:
    """Before Ray restores the run in `run_dir`: leave it a snapshot (`SNAPSHOT`, Ray's list of the run's
    checkpoints) that it can load. Ray's controller dies on one that is torn (a crash while Ray rewrote it) or that
    lists a checkpoint folder that is gone (deleted to free disk), and the rerun ends in an ActorDiedError.

    The run then resumes from the checkpoints that are left: the snapshot keeps only those (rebuilt from their
    trainer_state.json when torn); the damaged file is kept beside it as `<name>.damaged-<time>`, and a warning
    names both. A snapshot that is missing (deleted, or lost with a node's disk) beside checkpoint folders is
    rebuilt from them: Ray would otherwise start the run again from step 0. Nothing else is touched: a
    checkpoint folder is never removed here.

    Raises:
        TrainingError: no checkpoint is left to resume from, or Ray cannot read a whole snapshot written by
            another Ray version (naming the file and what to do).
    """
    if _CheckpointManagerState is None:
        return
    fs, root = storage.resolve(run_dir)
    path = f"{root}/{SNAPSHOT}"
    data = storage.read_or_none(fs, path)
    if data is None:  # deleted, or lost with the node: Ray would start from step 0 beside the run's checkpoints
        rebuilt = rebuilt_snapshot(fs, root)
        if rebuilt["latest_checkpoint_result"] is not None:
            write_snapshot(fs, path, rebuilt)
            log.warning("%s is missing; rebuilt from the run's checkpoint folders, the run resumes from %s", path,
                        rebuilt["latest_checkpoint_result"]["checkpoint_dir_name"])
        return
    try:
        snap = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        snap = None
    if not ray_reads(snap):
        version = snap.get("ray_version", ray.__version__) if isinstance(snap, dict) else ray.__version__
        if version != ray.__version__:
            raise TrainingError(f"{path} was written by Ray {version}, which this Ray ({ray.__version__}) cannot "
                                f"read: resume with Ray {version}, or give a new run.name to train from the start")
        kept, why = rebuilt_snapshot(fs, root), "is torn (not a whole snapshot)"
    else:
        listed = [r["checkpoint_dir_name"] for r in snap["checkpoint_results"]]
        gone = [n for n in listed if fs.get_file_info(f"{root}/{n}").type != pafs.FileType.Directory]
        if not gone:
            return
        kept, why = kept_snapshot(snap, set(listed) - set(gone)), f"lists checkpoints that are gone: {', '.join(gone)}"
    latest = kept["latest_checkpoint_result"]
    if latest is None:
        raise TrainingError(f"cannot resume the run in {run_dir}: {path} {why}, and no checkpoint is left to resume "
                            "from. Put the checkpoint folders back, or give a new run.name to train from the start")
    stamp = f"{path}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    aside = next(a for a in (f"{stamp}{f'.{i}' if i else ''}" for i in range(1000))
                 if fs.get_file_info(a).type == pafs.FileType.NotFound)
    fs.copy_file(path, aside)
    write_snapshot(fs, path, kept)
    log.warning("%s %s; the run resumes from %s (the damaged file is kept as %s)", path, why,
                latest["checkpoint_dir_name"], aside)


def write_snapshot(fs: pafs.FileSystem, path: str, snap: dict[str, Any]) -> None:
    """Replace Ray's snapshot at `path` with `snap`, whole or not at all (written beside it, then moved)."""
    with fs.open_output_stream(f"{path}.tmp") as f:
        f.write(json.dumps(snap).encode())
    fs.move(f"{path}.tmp", path)


def ray_reads(snap: Any) -> bool:
    """Whether Ray's own reader accepts the parsed snapshot `snap`."""
    try:
        _CheckpointManagerState.parse_obj(snap)
    except Exception:  # pydantic's ValidationError, or TypeError for what is not an object
        return False
    return True


def kept_snapshot(snap: dict[str, Any], present: set[str]) -> dict[str, Any]:
    """Ray's snapshot `snap` listing only the checkpoints in `present`; the newest reported of them is the latest."""
    pairs = [(r, i) for r, i in zip(snap["checkpoint_results"], snap["checkpoint_report_indices"])
             if r["checkpoint_dir_name"] in present]
    latest = snap.get("latest_checkpoint_result")
    if latest is None or latest["checkpoint_dir_name"] not in present:
        latest = max(pairs, key=lambda p: p[1])[0] if pairs else None
    pending = [(r, v) for r, v in zip(snap["pending_training_results"], snap["pending_validation_specs"])
               if r["checkpoint_dir_name"] in present]
    names = ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
             "failed_validation_checkpoint_dir_names")
    return {**snap, "checkpoint_results": [r for r, _ in pairs], "checkpoint_report_indices": [i for _, i in pairs],
            "latest_checkpoint_result": latest, "pending_training_results": [r for r, _ in pending],
            "pending_validation_specs": [v for _, v in pending],
            **{k: [n for n in snap.get(k, []) if n in present] for k in names}}


def rebuilt_snapshot(fs: pafs.FileSystem, root: str) -> dict[str, Any]:
    """Ray's snapshot for the run in `root`, from its checkpoint folders whose trainer_state.json holds a step,
    oldest step first (a folder without one is left out: Ray will not read or delete it)."""
    found = []
    for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            state = json.loads(storage.read_or_none(fs, f"{info.path}/{STATE_FILE}") or b"")
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            continue
        metrics = {"step": state["step"]}
        with contextlib.suppress(KeyError, TypeError, IndexError, ZeroDivisionError):  # an early step's state
            metrics = summary_metrics(state)
        found.append((state["step"], info.base_name, metrics))
    results = [{"version": 0, "checkpoint_dir_name": name, "metrics": m} for _, name, m in sorted(found)]
    return {"ray_version": ray.__version__, "checkpoint_results": results,
            "checkpoint_report_indices": list(range(len(results))),
            "latest_checkpoint_result": results[-1] if results else None, "pending_training_results": [],
            "pending_validation_specs": [], "current_report_index": len(results),
            "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
            "failed_validation_checkpoint_dir_names": []}


def save_checkpoint(engine, env: WorkerEnv, state: dict[str, Any], metrics: dict[str, float],
                    log_dir: str, artifact: Path | None = None) -> None:
    """Write engine state (+ an exported `artifact` dir, rank 0) and report it; all ranks call this.

    Ray registers the checkpoint only after every rank has reported, so a write interrupted by a
    crash never replaces the last good checkpoint. `trainer_state.json` is written last, listing every
    rank's files with their sizes (what `problem` checks on resume). A disk that fills up, here (the
    worker's temporary folder) or in the run's folder, is a TrainingError naming the folder and its space.
    """
    step = state["step"]
    with tempfile.TemporaryDirectory(prefix="diffray-ckpt-") as tmp:
        d = Path(tmp)
        with named_when_full(f"the checkpoint of step {step}", tmp, "this worker's temporary folder (TMPDIR)"):
            engine.save(d)
            engine.save_ema(d, env.is_main)
            hooks.current().checkpoint_written(env.rank, step, log_dir)
            if artifact is not None:
                shutil.copytree(artifact, d / ARTIFACT_DIR)
                shutil.rmtree(artifact, ignore_errors=True)
            sizes: dict[str, set] = {}
            for name, size in (f for rank_files in gather_objects(listing(d)) for f in rank_files):
                sizes.setdefault(name, set()).add(size)
            files = sorted([name, *s] for name, s in sizes.items() if len(s) == 1)  # two ranks wrote it: unchecked
            if env.is_main:
                (d / STATE_FILE).write_text(json.dumps({**state, FILES: files}))
        has_files = any(d.iterdir())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None,
                         checkpoint_upload_fn=upload_to_run(step) if has_files else None)


def upload_to_run(step: int):
    """Ray's upload of a rank's checkpoint into the run's folder (`ray.train.report`'s checkpoint_upload_fn), which
    removes what it half-wrote when it fails: a folder Ray never registered would hold the disk that filled up."""
    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        run = ray.train.get_context().get_storage()
        dest = run.build_checkpoint_path_from_name(dir_name)
        with removed_on_failure(run.storage_filesystem, dest, f"the checkpoint of step {step}", checkpoint.path):
            return run.persist_current_checkpoint(checkpoint, dir_name)
    return upload


@contextlib.contextmanager
def removed_on_failure(fs: pafs.FileSystem, dest: str, what: str, source: str):
    """Remove the folder `dest` (being written from the local folder `source`) when the write fails; a full disk
    becomes a TrainingError naming `dest`, the bytes to write and the bytes free."""
    try:
        yield
    except Exception as exc:
        with contextlib.suppress(OSError):
            fs.delete_dir(dest)
        gone = fs.get_file_info(dest).type == pafs.FileType.NotFound
        log.warning("%s was not written whole to %s (%s); its half-written folder %s", what, dest, exc,
                    "was removed" if gone else "could not be removed")
        why = write_failure(exc)
        if why is None:
            raise
        needed = sum(size for _, size in listing(Path(source)))
        raise TrainingError(write_failure_message(what, dest, why, needed, free_bytes(fs, dest), gone)) from None


@contextlib.contextmanager
def named_when_full(what: str, folder: str, which: str):
    """A full disk while writing into the local `folder` (removed afterwards by its owner) becomes a TrainingError
    naming it; `which` says whose folder it is."""
    try:
        yield
    except Exception as exc:
        why = write_failure(exc)
        if why is None:
            raise
        free = free_bytes(pafs.LocalFileSystem(), folder)
        raise TrainingError(write_failure_message(what, f"{which} {folder}", why, None, free, True)) from None


NO_SPACE = {errno.ENOSPC: "no space left on its disk", errno.EDQUOT: "the disk quota is exceeded"}
# safetensors' Rust writer says it in its text only: "I/O error: No space left on device (os error 28)"
NO_SPACE_TEXT = {os.strerror(errno.ENOSPC): NO_SPACE[errno.ENOSPC], os.strerror(errno.EDQUOT): NO_SPACE[errno.EDQUOT]}
# torch's zip writer has no errno when the disk fills: "unexpected pos 576 vs 534" or "file write failed"
SHORT_WRITE_TEXT = ("unexpected pos", "file write failed")


def write_failure(exc: BaseException | None) -> str | None:
    """Why a failed write (or what caused it) stopped, when it ran out of disk: no space, no quota, or a write
    that stopped short (torch says no more); None for any other error."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return NO_SPACE[exc.errno]
        text = str(exc)
        why = next((v for k, v in NO_SPACE_TEXT.items() if k in text), None)
        if why or any(t in text for t in SHORT_WRITE_TEXT):
            return why or f"the write stopped short ({text.strip().splitlines()[-1]})"
        exc = exc.__cause__ or exc.__context__
    return None


def free_bytes(fs: pafs.FileSystem, path: str) -> int | None:
    """Free bytes on the local disk holding `path` (its nearest existing folder); None on object storage."""
    if not isinstance(fs, pafs.LocalFileSystem):
        return None
    folder = next((f for f in (Path(path), *Path(path).parents) if f.is_dir()), None)
    return shutil.disk_usage(folder).free if folder is not None else None


def size_text(n: float) -> str:
    """`n` bytes as people read it: 512 bytes, 3.5 MiB."""
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return ""


def write_failure_message(what: str, where: str, why: str, needed: int | None, free: int | None,
                          removed: bool) -> str:
    """One line for a checkpoint the disk had no room for: what, where, why, the bytes needed and free when known,
    whether the half-written copy is gone, and what to do."""
    space = ", ".join(x for x in (f"{size_text(needed)} to write" if needed is not None else "",
                                  f"{size_text(free)} free" if free is not None else "") if x)
    left = "was removed" if removed else f"is left in {where}: remove it"
    # the driver adds how to resume (`runner.fit_checked`'s hint)
    return (f"cannot write {what} to {where}: {why}{f' ({space})' if space else ''}; the half-written checkpoint "
            f"{left}. Free space there (or lower train.keep_checkpoints)")
