"""A training run on the driver: check the job, connect to Ray, build the datasets and the method's
TorchTrainer, fit it while reporting progress, turn failures into one readable error, and copy the
artifact out of the final checkpoint. `diffray.tune.runner` builds its trials from the same pieces.
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from diffray import logs, storage
from diffray.cluster import check_resources, connect_ray, worker_env_vars
from diffray.errors import ConfigError, DiffrayError, TrainingError
from diffray.methods import method_of
from diffray.models.adapters import read_card, write_card
from diffray.trainers.checkpoints import repair_snapshot
from diffray.trainers.datasets import build_datasets
from diffray.trainers.loop import train_loop_per_worker, upload_logs
from diffray.trainers.progress import RunStatus, watch_progress
from diffray.trainers.rerun import check_rerun, record_settings
from diffray.trainers import tracking
from diffray.trainers.session import ARTIFACT_DIR, VALIDATION

log = logging.getLogger(__name__)
ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    run_dir: str
    artifact_dir: str
    log_dir: str
    steps: int
    loss_first_mean: float
    loss_last_mean: float
    wall_time_s: float
    metrics: dict[str, Any]

    def summary_line(self) -> str:
        val = f" val_loss={self.metrics['val_loss']:.4f}" if "val_loss" in self.metrics else ""
        val += f" reward={self.metrics['reward_mean']:.4f}" if "reward_mean" in self.metrics else ""
        return (f"done: steps={self.steps} loss first10={self.loss_first_mean:.4f} "
                f"last10={self.loss_last_mean:.4f}{val} artifact={self.artifact_dir} wall={self.wall_time_s:.1f}s")


def run_dirs(cfg) -> tuple[str, str]:
    """(run dir in storage, local log dir): logs beside the run on local disk, else written under ./runs-logs
    on each node and uploaded to the run's `logs/` (`logs_uri`)."""
    run_dir = storage.join(storage.absolute(cfg.run.storage_path), cfg.run.name)
    return run_dir, storage.local_dir(run_dir, "logs")


def logs_uri(run_dir: str) -> str | None:
    """Where a run on object storage keeps its logs (None on local disk: they are written there)."""
    return storage.join(run_dir, "logs") if storage.is_uri(run_dir) else None


def build_trainer(cfg, model_path: str, datasets: dict[str, Any], log_dir: str, status,
                  callbacks: list | None = None, report_validation: bool = False,
                  logs_uri: str | None = None) -> TorchTrainer:
    """A configured TorchTrainer for `cfg.method`; `callbacks` are Ray Train user callbacks (Tune's
    report callback in a trial), `report_validation` reports val_loss at every validation step,
    `logs_uri` (a run on object storage) is where the workers upload their logs at each checkpoint."""
    s = cfg.scaling
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=storage.absolute(cfg.run.storage_path),
        failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        worker_runtime_env={"env_vars": worker_env_vars()},
        callbacks=callbacks or None,
        logging_config=ray.train.LoggingConfig(log_level="INFO" if logs.verbose() else "WARNING"),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"method": method_of(cfg.method), "cfg": cfg.model_dump(mode="json"),
                           "model_path": model_path, "log_dir": log_dir, "status_actor": status,
                           "has_validation": VALIDATION in datasets, "report_validation": report_validation,
                           "logs_uri": logs_uri},
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=s.worker_bundle()),
        run_config=run_config,
        datasets=datasets,
        # The validation rows are not split: every worker computes the same val_loss over all of them.
        dataset_config=ray.train.DataConfig(datasets_to_split=[n for n in datasets if n != VALIDATION],
                                            execution_options=ingest_options()),
    )


def ingest_options():
    """Ray Train's ingest options with `preserve_order`: each worker's split gets the same rows in the
    same order on every run (Ray's OutputSplitter then drops locality hints for determinism), so a seed
    reproduces a run's losses; see `diffray.data.raydata.in_order`.

    Built here rather than by `DataConfig.default_ingest_options()`, which passes `exclude_resources` on
    and so prints Ray Data's RayDeprecationWarning on every `diffray train` terminal; the context's
    exclusion is carried over only where someone set one."""
    from ray.data import ExecutionOptions
    from ray.data.context import DataContext

    ctx = DataContext.get_current().execution_options
    opts = ExecutionOptions(resource_limits=ctx.resource_limits, preserve_order=True,
                            verbose_progress=ctx.verbose_progress)
    if ctx.exclude_resources != type(ctx.exclude_resources).zero():
        opts.exclude_resources = ctx.exclude_resources
    return opts


def fit_checked(trainer: TorchTrainer, status, what: str, log_dir: str, hint: str = "",
                on_progress: ProgressCallback | None = None) -> ray.train.Result:
    """`trainer.fit()`, passing rank 0's step metrics to `on_progress` meanwhile. A worker failure or a
    NaN/inf loss becomes a TrainingError naming `what` (e.g. "training run 'x'"), the cause and the logs."""
    main = threading.current_thread() is threading.main_thread()  # where Ray Train registers its SIGINT handler
    previous = signal.getsignal(signal.SIGINT) if main else None
    with watch_progress(status, on_progress):
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise TrainingError(f"{what} failed: {root_cause(exc)} (logs: {log_dir}{hint})") from None
        except SystemExit:
            if not main:
                raise
            # Ctrl-C: Ray Train's handler aborted the run (its registered checkpoints stay) and called sys.exit(0),
            # which ended `diffray train` with status 1 and not a word; a KeyboardInterrupt exits 130.
            log.warning("%s interrupted; its checkpoints are kept: rerun the same command to resume (logs: %s)",
                        what, log_dir)
            raise KeyboardInterrupt from None
        finally:
            if main:  # Ray's handler outlives fit(): a later Ctrl-C (exporting the artifact) would exit 0 silently
                signal.signal(signal.SIGINT, previous)
    reported = ray.get(status.get.remote())
    for damaged in reported.get("skipped_checkpoints") or []:
        log.warning("%s resumed from an older checkpoint, skipping a damaged one: %s", what, damaged)
    step = reported.get("nonfinite_loss_step")
    if step is not None:
        last = result.checkpoint.path if result.checkpoint else "none"
        raise TrainingError(f"{what}: loss became NaN/inf at step {step}; training stopped. Last good checkpoint: "
                            f"{last}. Try a lower optim.lr or optim.max_grad_norm under a new run.name (a rerun "
                            f"resumes with the run's own settings) (logs: {log_dir}).")
    return result


def run_training(cfg, on_progress: ProgressCallback | None = None) -> RunResult:
    """Train `cfg` on the connected cluster; resume if a run of that name exists; export the artifact.
    `on_progress(metrics)` sees rank 0's numbers after every step (the CLI draws its bar from them)."""
    from diffray.models.loading import resolve_model_path

    t0 = time.time()
    model_path = resolve_model_path(cfg.model.path)
    method_of(cfg.method).check(cfg, model_path)
    tracking.check(cfg.tracking)
    run_dir, log_dir = run_dirs(cfg)
    check_storage(run_dir)
    check_rerun(cfg, run_dir)
    repair_snapshot(run_dir)  # what Ray reads to resume: a torn one, or one listing deleted checkpoints
    connect_ray()
    check_resources(cfg.scaling)
    remote_logs = logs_uri(run_dir)
    handler = logs.attach_run_log(f"{log_dir}/driver.log")
    try:
        datasets = build_datasets(cfg, model_path, log_dir)
        record_settings(cfg, run_dir)
        status = RunStatus.remote()
        result = fit_checked(build_trainer(cfg, model_path, datasets, log_dir, status, logs_uri=remote_logs),
                             status, f"training run {cfg.run.name!r}", log_dir,
                             "; rerun the same command to resume from the last checkpoint", on_progress)
        if result.checkpoint is None:
            raise TrainingError(f"run {cfg.run.name!r} ended without a checkpoint")
        artifact = export_artifact(result.checkpoint, storage.join(run_dir, ARTIFACT_DIR))
    finally:
        logs.detach_run_log(handler)
        if remote_logs:  # the driver's log and data reports (and this node's worker logs), success or not
            upload_logs(log_dir, remote_logs)
    m = result.metrics or {}
    wall = time.time() - t0
    if not storage.is_uri(artifact):
        write_card(artifact, {**read_card(artifact), "wall_time_s": round(wall, 3)})
    return RunResult(run_dir, artifact, log_dir, int(m.get("step", 0)), float(m.get("loss_first_mean", float("nan"))),
                     float(m.get("loss_last_mean", float("nan"))), wall, dict(m))


def check_storage(run_dir: str) -> None:
    """A run dir on local disk can be created and written (object storage is checked when it is opened).

    Raises:
        ConfigError: naming run.storage_path, the folder and why (a file in the way, no permission, disk full).
    """
    if storage.is_uri(run_dir):
        return
    blocker = next((p for p in (Path(run_dir), *Path(run_dir).parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{blocker} is a file, not a folder (the run's folder would be {run_dir})",
                          field="run.storage_path")
    # folders made for the check are removed again: a run refused later (resources, a rerun's settings) leaves none
    created = storage.first_missing(run_dir)
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".diffray-write-check-"):
            pass
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename and exc.filename != run_dir else ""
        raise ConfigError(f"cannot write the run's folder {run_dir}: {exc.strerror or exc}{where}",
                          field="run.storage_path") from None
    finally:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)


def export_artifact(checkpoint: ray.train.Checkpoint, dest: str) -> str:
    """Copy the checkpoint's `artifact/` to `dest`; on local disk the swap is atomic."""
    fs, src = checkpoint.filesystem, f"{checkpoint.path}/{ARTIFACT_DIR}"
    if fs.get_file_info(src).type != pafs.FileType.Directory:
        raise TrainingError(f"final checkpoint {checkpoint.path} holds no {ARTIFACT_DIR}/")
    return storage.copy_dir(fs, src, dest)


def root_cause(exc: BaseException) -> str:
    """The innermost meaningful message of a (possibly Ray-wrapped) worker failure."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        rank, err = sorted(failures.items())[0]
        cause = err
        while getattr(cause, "cause", None) is not None:
            cause = cause.cause
        if isinstance(cause, DiffrayError):
            return str(cause)
        text = str(cause).strip().splitlines()
        return f"worker rank {rank}: {type(cause).__name__}: {text[-1] if text else ''}"
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
