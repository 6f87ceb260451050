"""Resuming a run after damage to its Ray Train storage folder, without a cluster.

Ray's own run snapshot (`checkpoint_manager_snapshot.json`, written with Ray's own model below) is read by Ray's
own CheckpointManager, as the run's controller does when `diffray train` is rerun: a torn snapshot, or one listing
a checkpoint folder someone deleted, kills it (the rerun ended in an ActorDiedError); `repair_snapshot` runs first
and leaves one Ray loads, or one line. A disk that fills up while a checkpoint is written is a real ENOSPC from
/dev/full (a folder's file is a link to it: a small disk needs root to mount), which names the folder and leaves
no half-written checkpoint."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from ray.train import Checkpoint, CheckpointConfig
from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError
from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (CheckpointManager,
                                                                             _CheckpointManagerState,
                                                                             _TrainingResultState)
from ray.train.v2._internal.execution.storage import StorageContext
from safetensors.torch import save_file

from diffray.errors import TrainingError
from diffray.trainers.checkpoints import (FILES, SNAPSHOT, listing, named_when_full, pick, removed_on_failure,
                                          repair_snapshot, write_failure, write_failure_message)

NAMES = [f"checkpoint_2026-12-07_01-50-1{i}.000000" for i in range(3)]  # Ray's names: oldest first


def make_run(run: Path, steps=(2, 4, 6)) -> None:
    """A run folder as Ray Train 2.60 leaves it: checkpoint folders and Ray's snapshot listing them."""
    for name, step in zip(NAMES, steps):
        d = run / name
        d.mkdir(parents=True)
        save_file({"w": torch.full((16,), float(step))}, str(d / "trainable.safetensors"))
        state = {"step": step, "first_losses": [1.0], "recent_losses": [0.5]}
        (d / "trainer_state.json").write_text(json.dumps({**state, FILES: listing(d)}))
    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={"step": s}) for n, s in zip(NAMES, steps)]
    snap = _CheckpointManagerState(checkpoint_results=results, checkpoint_report_indices=[1, 3, 5],
                                   latest_checkpoint_result=results[-1], pending_training_results=[],
                                   pending_validation_specs=[], current_report_index=6,
                                   validated_checkpoint_dir_names=[], timed_out_validation_checkpoint_dir_names=[],
                                   failed_validation_checkpoint_dir_names=[])
    (run / SNAPSHOT).write_text(snap.json())


def ray_latest(run: Path) -> str:
    """The checkpoint Ray's controller hands the workers when it restores the run (`ray.train.get_checkpoint`)."""
    manager = CheckpointManager(CheckpointConfig(num_to_keep=3), StorageContext(str(run.parent), run.name))
    return Path(manager.latest_checkpoint_result.checkpoint.path).name


def asides(run: Path) -> list[Path]:
    return sorted(run.glob(f"{SNAPSHOT}.damaged-*"))


@pytest.mark.parametrize("damage, resumes_from", [
    ("gone:2", NAMES[1]),             # the newest folder deleted to free disk: the one before it
    ("gone:1", NAMES[2]),             # an older one deleted: the newest still
    ("gone:1,2", NAMES[0]),
    ("torn", NAMES[2]),               # Ray's snapshot cut while Ray rewrote it: rebuilt from the folders
    ("torn+gone:2", NAMES[1]),
])
def test_a_damaged_ray_snapshot_resumes_from_the_newest_checkpoint_left(tmp_path, caplog, damage, resumes_from):
    run = tmp_path / "runs" / "r"
    make_run(run)
    for i in (damage.split("gone:")[1].split(",") if "gone:" in damage else []):
        shutil.rmtree(run / NAMES[int(i)])
    if damage.startswith("torn"):
        (run / SNAPSHOT).write_bytes((run / SNAPSHOT).read_bytes()[:150])
    before = (run / SNAPSHOT).read_bytes()
    with pytest.raises(CheckpointManagerInitializationError):  # what the rerun's controller died of
        ray_latest(run)
    kept = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_2"))

    with caplog.at_level(logging.WARNING, logger="diffray.trainers.checkpoints"):
        repair_snapshot(str(run))

    assert ray_latest(run) == resumes_from
    [aside] = asides(run)
    assert aside.read_bytes() == before  # the damaged file is kept as it was
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_2")) == kept  # none removed
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"resumes from {resumes_from}" in warning and str(aside) in warning and str(run / SNAPSHOT) in warning
    assert ("is torn" if damage.startswith("torn") else "lists checkpoints that are gone") in warning
    if damage.startswith("torn"):  # Ray's metrics come back from each folder's trainer_state.json
        listed = json.loads((run / SNAPSHOT).read_text())["checkpoint_results"]
        assert [(r["checkpoint_dir_name"], r["metrics"]) for r in listed] == [
            (n, {"step": s, "loss": 0.5, "loss_first_mean": 1.0, "loss_last_mean": 0.5})
            for n, s in zip(NAMES, (2, 4, 6)) if n in kept]


def test_a_whole_snapshot_is_left_as_it_is(tmp_path, caplog):
    run = tmp_path / "r"
    make_run(run)
    before = (run / SNAPSHOT).read_bytes()
    with caplog.at_level(logging.WARNING):
        repair_snapshot(str(run))
        repair_snapshot(str(tmp_path / "fresh"))  # no run yet: nothing to read
    assert (run / SNAPSHOT).read_bytes() == before and not asides(run) and not caplog.records
    assert ray_latest(run) == NAMES[2]


@pytest.mark.parametrize("damage", ["gone:all", "torn:all"])
def test_a_snapshot_with_no_checkpoint_left_is_one_line_naming_it(tmp_path, damage):
    run = tmp_path / "r"
    make_run(run)
    for name in NAMES:
        shutil.rmtree(run / name)
    if damage.startswith("torn"):
        (run / SNAPSHOT).write_bytes((run / SNAPSHOT).read_bytes()[:150])
    before = (run / SNAPSHOT).read_bytes()
    with pytest.raises(TrainingError) as err:
        repair_snapshot(str(run))
    gone = f"lists checkpoints that are gone: {', '.join(NAMES)}"
    why = "is torn (not a whole snapshot)" if damage.startswith("torn") else gone
    assert str(err.value) == (f"cannot resume the run in {run}: {run / SNAPSHOT} {why}, and no checkpoint is left "
                              "to resume from. Put the checkpoint folders back, or give a new run.name to train "
                              "from the start")
    assert (run / SNAPSHOT).read_bytes() == before and not asides(run)  # nothing changed


def test_a_missing_snapshot_beside_checkpoints_is_rebuilt_and_the_run_resumes(tmp_path, caplog):
    """Ray's snapshot deleted (or lost with a node's disk) while the checkpoint folders are left: Ray started the run
    again from step 0 beside them, silently. A first checkpoint that never got its trainer_state.json is no run
    to resume: nothing is written, and Ray starts it again as before."""
    run = tmp_path / "r"
    make_run(run)
    (run / SNAPSHOT).unlink()
    manager = CheckpointManager(CheckpointConfig(num_to_keep=3), StorageContext(str(run.parent), run.name))
    assert manager.latest_checkpoint_result is None  # what Ray's controller saw: a run with nothing to resume
    with caplog.at_level(logging.WARNING, logger="diffray.trainers.checkpoints"):
        repair_snapshot(str(run))
    assert ray_latest(run) == NAMES[2]
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning == (f"{run / SNAPSHOT} is missing; rebuilt from the run's checkpoint folders, the run resumes "
                       f"from {NAMES[2]}")

    half = tmp_path / "half"
    (half / NAMES[0]).mkdir(parents=True)  # Ray's upload of the first checkpoint stopped before its state file
    repair_snapshot(str(half))
    assert not (half / SNAPSHOT).exists()


def test_a_snapshot_of_another_ray_is_named_with_both_versions(tmp_path):
    import ray

    run = tmp_path / "r"
    make_run(run)
    (run / SNAPSHOT).write_text(json.dumps({"ray_version": "9.9.9", "checkpoints": []}))  # another schema
    with pytest.raises(TrainingError, match=re.escape(f"{run / SNAPSHOT} was written by Ray 9.9.9, which this "
                                                      f"Ray ({ray.__version__}) cannot read")):
        repair_snapshot(str(run))
    assert not asides(run)


def test_a_torn_snapshot_with_a_half_written_newest_folder_resumes_from_a_whole_one(tmp_path):
    """A crash while Ray uploaded the newest checkpoint and rewrote the snapshot: the rebuilt snapshot lists the
    half-written folder (its trainer_state.json arrived), and the workers' `pick` skips it."""
    run = tmp_path / "r"
    make_run(run)
    half = run / NAMES[2] / "trainable.safetensors"
    half.write_bytes(half.read_bytes()[:40])
    (run / SNAPSHOT).write_bytes((run / SNAPSHOT).read_bytes()[:100])
    repair_snapshot(str(run))
    latest = Checkpoint(str(run / ray_latest(run)), filesystem=pafs.LocalFileSystem())
    chosen, skipped = pick(latest)
    assert Path(chosen).name == NAMES[1]
    whole = (run / NAMES[1] / half.name).stat().st_size
    assert skipped == [f"{run / NAMES[2]}: trainable.safetensors has 40 bytes, {whole} were written"]


# --- a full disk while a checkpoint is written -------------------------------------------------------------------

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full to fill a write")


@needs_dev_full
def test_a_full_disk_in_the_run_folder_names_it_and_removes_the_half_written_checkpoint(tmp_path, caplog):
    """Ray's upload of a rank's checkpoint (pyarrow's copy into the run folder) stops on ENOSPC: one line naming
    the folder, the bytes to write and free, and no half-written folder left to fill the disk."""
    local = tmp_path / "local"
    local.mkdir()
    (local / "a.bin").write_bytes(b"a" * 3000)
    (local / "b.bin").write_bytes(b"b" * 2000)
    dest = tmp_path / "run" / NAMES[0]
    dest.mkdir(parents=True)
    os.symlink("/dev/full", dest / "b.bin")  # the disk has no room for b.bin
    fs = pafs.LocalFileSystem()
    with pytest.raises(TrainingError) as err, caplog.at_level(logging.WARNING):
        with removed_on_failure(fs, str(dest), "the checkpoint of step 6", str(local)):
            pafs.copy_files(str(local), str(dest), source_filesystem=fs, destination_filesystem=fs)
    assert re.fullmatch(
        rf"cannot write the checkpoint of step 6 to {re.escape(str(dest))}: no space left on its disk "
        r"\(4\.9 KiB to write, [0-9.]+ (bytes|KiB|MiB|GiB) free\); the half-written checkpoint was removed\. Free "
        r"space there \(or lower train\.keep_checkpoints\)", str(err.value)), str(err.value)
    assert not dest.exists() and (tmp_path / "run").is_dir() and os.path.exists("/dev/full")
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"the checkpoint of step 6 was not written whole to {dest} (") and \
        warning.endswith("No space left on device); its half-written folder was removed"), warning


@needs_dev_full
@pytest.mark.parametrize("writer, why", [
    ("python", "no space left on its disk"),  # an OSError with errno 28
    ("torch", "the write stopped short (")])  # torch's zip writer: no errno, only "unexpected pos"
def test_a_full_disk_in_the_worker_temp_folder_names_it(tmp_path, writer, why):
    os.symlink("/dev/full", tmp_path / "weights")
    with pytest.raises(TrainingError) as err:
        with named_when_full("the checkpoint of step 6", str(tmp_path), "this worker's temporary folder (TMPDIR)"):
            if writer == "torch":
                torch.save({"w": torch.zeros(100_000)}, tmp_path / "weights")
            else:
                (tmp_path / "weights").write_bytes(b"w" * 100_000)
    assert str(err.value).startswith(f"cannot write the checkpoint of step 6 to this worker's temporary folder "
                                     f"(TMPDIR) {tmp_path}: {why}"), str(err.value)
    assert " free); the half-written checkpoint was removed. Free space there" in str(err.value)


def test_another_write_error_is_not_called_a_full_disk_and_still_leaves_no_half_written_folder(tmp_path):
    dest = tmp_path / NAMES[0]
    dest.mkdir()
    (dest / "part").write_bytes(b"x")
    with pytest.raises(PermissionError):
        with removed_on_failure(pafs.LocalFileSystem(), str(dest), "the checkpoint of step 6", str(tmp_path)):
            raise PermissionError(errno.EACCES, "Permission denied", str(dest / "part"))
    assert not dest.exists()
    with pytest.raises(KeyError):  # a bug is not a write failure
        with named_when_full("the checkpoint of step 6", str(tmp_path), "tmp"):
            raise KeyError("step")


def test_write_failures_and_their_line():
    assert write_failure(OSError(errno.ENOSPC, "No space left on device")) == "no space left on its disk"
    assert write_failure(OSError(errno.EDQUOT, "Disk quota exceeded")) == "the disk quota is exceeded"
    # safetensors (it writes a temporary file, then renames it) on a full tmpfs: its Rust error, no errno
    full = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert write_failure(full) == "no space left on its disk"
    wrapped = RuntimeError("upload failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "Error writing bytes to file")
    assert write_failure(wrapped) == "no space left on its disk"
    assert write_failure(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")) == \
        "the write stopped short (PytorchStreamWriter failed writing file data/0: file write failed)"
    assert write_failure(OSError(errno.EACCES, "Permission denied")) is None
    assert write_failure_message("the checkpoint of step 3", "s3://b/run/ckpt", "no space left on its disk",
                                 None, None, False) == (
        "cannot write the checkpoint of step 3 to s3://b/run/ckpt: no space left on its disk; the half-written "
        "checkpoint is left in s3://b/run/ckpt: remove it. Free space there (or lower train.keep_checkpoints)")
    assert "(512 bytes to write, 3.0 GiB free)" in write_failure_message("x", "d", "y", 512, 3 * 2**30, True)


def test_a_rerun_whose_checkpoints_are_all_gone_stops_before_ray_with_one_line(tmp_path):
    """`diffray train` checks Ray's snapshot before Ray starts (the rerun ended in an ActorDiedError from inside
    Ray's controller)."""
    from diffray.config import apply_overrides
    from diffray.methods import validate_config
    from diffray.trainers.rerun import record_settings
    from diffray.trainers.runner import run_training

    cfg = validate_config(apply_overrides({"method": "lora", "run": {"name": "r"}},
                                          [f"run.storage_path={tmp_path}", "model.path=builtin:tiny-random"]))
    make_run(tmp_path / "r")
    record_settings(cfg, str(tmp_path / "r"))
    for name in NAMES:
        shutil.rmtree(tmp_path / "r" / name)
    with pytest.raises(TrainingError, match=re.escape(f"cannot resume the run in {tmp_path / 'r'}: ")):
        run_training(cfg)
