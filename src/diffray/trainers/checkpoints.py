"""Checkpoint save + report + restore on the workers, and the check that a checkpoint is whole.

A checkpoint Ray registered can still be damaged when it is read back: a node that lost power before its
page cache reached the disk leaves zero-byte or truncated files, a person deletes a file, a copy stops
half-way. Resuming from it would fail the same way on every rerun while older intact checkpoints sit
beside it, so `restore` takes the newest checkpoint that passes `problem` (every file the ranks wrote,
listed with its size in `trainer_state.json`, which is written last) and says which ones it skipped.
Runs on Ray Train workers only; `problem` is pure (files only).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train

from diffray.errors import TrainingError
from diffray.trainers import hooks
from diffray.trainers.session import ARTIFACT_DIR, STATE_FILE, WorkerEnv, broadcast_from_main, gather_objects

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


def save_checkpoint(engine, env: WorkerEnv, state: dict[str, Any], metrics: dict[str, float],
                    log_dir: str, artifact: Path | None = None) -> None:
    """Write engine state (+ an exported `artifact` dir, rank 0) and report it; all ranks call this.

    Ray registers the checkpoint only after every rank has reported, so a write interrupted by a
    crash never replaces the last good checkpoint. `trainer_state.json` is written last, listing every
    rank's files with their sizes (what `problem` checks on resume).
    """
    with tempfile.TemporaryDirectory(prefix="diffray-ckpt-") as tmp:
        d = Path(tmp)
        engine.save(d)
        engine.save_ema(d, env.is_main)
        hooks.current().checkpoint_written(env.rank, state["step"], log_dir)
        if artifact is not None:
            shutil.copytree(artifact, d / ARTIFACT_DIR)
            shutil.rmtree(artifact, ignore_errors=True)
        sizes: dict[str, set] = {}
        for name, size in (f for rank_files in gather_objects(listing(d)) for f in rank_files):
            sizes.setdefault(name, set()).add(size)
        files = sorted([name, *s] for name, s in sizes.items() if len(s) == 1)  # a name two ranks wrote: unchecked
        if env.is_main:
            (d / STATE_FILE).write_text(json.dumps({**state, FILES: files}))
        has_files = any(d.iterdir())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)
