"""The Ray edge on the driver: connect to a cluster, build the TorchTrainer for a method, run it,
turn failures into one readable error, and export the final artifact out of the last checkpoint.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train.torch import TorchTrainer

from diffray.errors import ConfigError, DatasetError, DiffrayError, TrainingError
from diffray.models.adapters import read_card, write_card
from diffray.trainers.session import ARTIFACT_DIR, VALIDATION

# method -> "module:function" of its per-worker loop (imported lazily: workers import it themselves)
TRAIN_LOOPS = {
    "lora": "diffray.trainers.lora:train_loop_per_worker",
    "dreambooth": "diffray.trainers.dreambooth:train_loop_per_worker",
    "textual_inversion": "diffray.trainers.textual_inversion:train_loop_per_worker",
    "controlnet": "diffray.trainers.controlnet:train_loop_per_worker",
    "ddpo": "diffray.trainers.ddpo:train_loop_per_worker",
}

WORKER_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def connect_ray() -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`) or start a local one.

    A local cluster keeps Ray's defaults for token auth and binds nothing beyond localhost. Its dashboard
    (127.0.0.1 only) is on because Ray Train's placement-group cleaner asks the state API whether a
    controller has died: without it a trial that Tune stops leaks its workers' placement group.
    """
    if ray.is_initialized():
        return
    os.environ.update({k: os.environ.get(k, v) for k, v in WORKER_ENV.items()})
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True)


@ray.remote(num_cpus=0)
class RunStatus:
    """Side channel from workers to the driver for outcomes that are not checkpoints."""

    def __init__(self):
        self.values: dict[str, Any] = {}

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value

    def get(self) -> dict[str, Any]:
        return dict(self.values)


@dataclass
class RunResult:
    run_dir: str
    artifact_dir: str
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


def storage_root(storage_path: str) -> str:
    """Absolute local path or URI; relative local paths resolve against the driver's cwd."""
    return storage_path if "://" in storage_path else str(Path(storage_path).expanduser().resolve())


def resolve_loop(method: str):
    module, fn = TRAIN_LOOPS[method].split(":")
    return getattr(importlib.import_module(module), fn)


def preflight(cfg, model_path: str) -> None:
    """The method's driver-side checks (an optional `preflight(cfg, model_path)` next to its loop), run
    before Ray starts so bad input fails fast with one line."""
    check = getattr(importlib.import_module(TRAIN_LOOPS[cfg.method].split(":")[0]), "preflight", None)
    if check is not None:
        check(cfg, model_path)


def build_dataset(cfg, model_path: str, report_dir: str | None = None, path: str | None = None,
                  prompt: str | None = None, id_offset: int = 0):
    """A training dataset (Ray Data) of `path` (default `data.path`): validated (bad rows quarantined
    to `report_dir/quarantine.jsonl`), preprocessed or read from the latent cache, materialized when
    configured. `prompt` replaces every caption; `id_offset` shifts sample ids.

    Raises:
        DatasetError: a bad source, too many bad rows, or fewer rows than one global batch.
    """
    from diffray.data import resolve_data_path

    d = cfg.data
    path = resolve_data_path(d.path) if path is None else path
    if d.cache != "off":
        from diffray.data.cache import cached_dataset

        ds = cached_dataset(cfg, model_path, path, prompt, id_offset)
    else:
        from diffray.data.pipeline import prepare_training_dataset

        ds, _ = prepare_training_dataset(path, model_path, d, cfg.run.seed, report_dir, prompt, id_offset)
    if d.materialize:
        ds = ds.materialize()
    rows = ds.count()
    need = cfg.scaling.num_workers * cfg.train.micro_batch_size
    if rows < need:
        raise DatasetError(f"{path}: {rows} usable rows, but num_workers x micro_batch_size = {need} are needed "
                           "per step")
    return ds


@dataclass(frozen=True)
class DataSource:
    """One dataset a method trains on: where, an optional caption for every row, a sample-id offset."""

    path: str
    prompt: str | None = None
    id_offset: int = 0


def dataset_sources(cfg, model_path: str) -> dict[str, DataSource]:
    """The method's named datasets: its module's `dataset_sources(cfg, model_path)` when it has one
    (which may prepare data on the driver first, e.g. generate class images), else {"train": data.path}."""
    from diffray.data import resolve_data_path

    module = importlib.import_module(TRAIN_LOOPS[cfg.method].split(":")[0])
    sources = getattr(module, "dataset_sources", None)
    if sources is not None:
        return sources(cfg, model_path)
    return {"train": DataSource(resolve_data_path(cfg.data.path))}


def build_datasets(cfg, model_path: str, report_dir: str | None = None) -> dict[str, Any]:
    """{name: training dataset} for the method; quarantine reports go to report_dir (the first
    dataset's) or report_dir/<name>. With `data.validation_fraction` the first dataset's held-out rows
    become the `validation` dataset (every worker reads all of it)."""
    out = {}
    for i, (name, src) in enumerate(dataset_sources(cfg, model_path).items()):
        reports = report_dir if report_dir is None or i == 0 else f"{report_dir}/{name}"
        out[name] = build_dataset(cfg, model_path, reports, src.path, src.prompt, src.id_offset)
        if i == 0 and cfg.data.validation_fraction > 0:
            out[name], out[VALIDATION] = split_validation(out[name], cfg, src.path)
    return out


def split_validation(ds, cfg, path: str):
    """(training rows, held-out rows) of a built dataset; DatasetError when either side is too small."""
    from diffray.data.pipeline import keep_rows

    f = cfg.data.validation_fraction
    train, held = (ds.map_batches(keep_rows, fn_kwargs={"fraction": f, "held_out": side}, batch_format="numpy")
                   for side in (False, True))
    if cfg.data.materialize:
        train, held = train.materialize(), held.materialize()
    n_train, n_held = train.count(), held.count()
    need = cfg.scaling.num_workers * cfg.train.micro_batch_size
    if n_held == 0 or n_train < need:
        raise DatasetError(f"{path}: data.validation_fraction={f:g} holds out {n_held} rows and leaves {n_train} "
                           f"for training (need >= 1 and >= {need}); change the fraction or add data")
    print(f"data {path}: {n_held} rows held out for val_loss, {n_train} train", file=sys.stderr, flush=True)
    return train, held


def prepare_data(cfg) -> dict[str, str]:
    """`diffray data prepare`: validate and encode every dataset the job trains on into the latent
    cache (`data.cache`; `auto` when off), without training. Returns {dataset name: cache folder}."""
    from diffray.data.cache import build_cache
    from diffray.models.loading import resolve_model_path

    if cfg.data is None:
        raise ConfigError(f"method {cfg.method} trains without a dataset: there is nothing to prepare", field="data")
    if cfg.data.cache == "off":
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache": "auto"})})
    model_path = resolve_model_path(cfg.model.path)
    preflight(cfg, model_path)
    connect_ray()
    check_resources(cfg.scaling)
    return {name: str(build_cache(cfg, model_path, src.path, src.prompt, src.id_offset)[0])
            for name, src in dataset_sources(cfg, model_path).items()}


def build_trainer(cfg, model_path: str, datasets: dict[str, Any], log_dir: str, status,
                  callbacks: list | None = None, report_validation: bool = False) -> TorchTrainer:
    """A configured TorchTrainer for `cfg.method`; `callbacks` are Ray Train user callbacks (Tune's
    report callback in a trial), `report_validation` reports val_loss at every validation step."""
    s = cfg.scaling
    resources = s.worker_bundle()
    run_config = ray.train.RunConfig(
        name=cfg.run.name,
        storage_path=storage_root(cfg.run.storage_path),
        failure_config=ray.train.FailureConfig(max_failures=cfg.failure.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
        worker_runtime_env={"env_vars": WORKER_ENV},
        callbacks=callbacks or None,
    )
    return TorchTrainer(
        resolve_loop(cfg.method),
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "model_path": model_path, "log_dir": log_dir,
                           "status_actor": status, "progress_bar": cfg.train.progress_bar and sys.stdout.isatty(),
                           "has_validation": VALIDATION in datasets, "report_validation": report_validation},
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources),
        run_config=run_config,
        datasets=datasets,
        # The validation rows are not split: every worker computes the same val_loss over all of them.
        dataset_config=ray.train.DataConfig(datasets_to_split=[n for n in datasets if n != VALIDATION]),
    )


def workers_that_fit(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many worker bundles the nodes (their total resources) can hold, each bundle on one node."""
    fit = 0
    for node in nodes:
        fit += int(min((node.get(k, 0.0) / v for k, v in bundle.items() if v > 0), default=0) + 1e-9)
    return fit


def check_resources(scaling) -> None:
    """Fail fast when the cluster's alive nodes can never hold `scaling.num_workers` workers (unless
    `scaling.wait_for_resources`): Ray would otherwise wait forever for a placement.

    Raises:
        ConfigError: naming each resource a worker needs, the count and what the nodes have.
    """
    if scaling.wait_for_resources:
        return
    bundle = scaling.worker_bundle()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fit = workers_that_fit(bundle, nodes)
    if fit >= scaling.num_workers:
        return
    need = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    have = "; ".join(", ".join(f"{n.get(k, 0):g} {k}" for k in bundle) for n in nodes) or "no nodes"
    raise ConfigError(f"scaling: {scaling.num_workers} workers x ({need}) do not fit this cluster, whose "
                      f"{len(nodes)} node(s) have [{have}] (room for {fit}); lower scaling.num_workers or "
                      "cpus_per_worker, set scaling.use_gpu=false, or scaling.wait_for_resources=true on an "
                      "autoscaling cluster")


def run_dirs(cfg) -> tuple[str, str]:
    """(run dir in storage, local log dir): logs stay beside the run on local disk, else under ./runs-logs."""
    run_dir = f"{storage_root(cfg.run.storage_path).rstrip('/')}/{cfg.run.name}"
    log_dir = str(Path(run_dir) / "logs") if "://" not in run_dir else str(Path.cwd() / "runs-logs" / cfg.run.name)
    return run_dir, log_dir


def run_training(cfg) -> RunResult:
    """Train `cfg` on the connected cluster; resume if a run of that name exists; export the artifact."""
    from diffray.models.loading import resolve_model_path

    t0 = time.time()
    model_path = resolve_model_path(cfg.model.path)
    preflight(cfg, model_path)
    connect_ray()
    check_resources(cfg.scaling)
    run_dir, log_dir = run_dirs(cfg)
    datasets = build_datasets(cfg, model_path, log_dir)
    status = RunStatus.remote()
    try:
        result = build_trainer(cfg, model_path, datasets, log_dir, status).fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(f"training run {cfg.run.name!r} failed: {root_cause(exc)} "
                            f"(logs: {log_dir}; rerun the same command to resume from the last checkpoint)") from None
    outcome = ray.get(status.get.remote())
    if "nonfinite_loss_step" in outcome:
        last = result.checkpoint.path if result.checkpoint else "none"
        raise TrainingError(f"loss became NaN/inf at step {outcome['nonfinite_loss_step']}; training stopped. "
                            f"Last good checkpoint: {last}. Try a lower optim.lr or optim.max_grad_norm.")
    if result.checkpoint is None:
        raise TrainingError(f"run {cfg.run.name!r} ended without a checkpoint")
    artifact = export_artifact(result.checkpoint, f"{run_dir}/{ARTIFACT_DIR}")
    m = result.metrics or {}
    wall = time.time() - t0
    if "://" not in artifact:
        write_card(artifact, {**read_card(artifact), "wall_time_s": round(wall, 3)})
    return RunResult(run_dir, artifact, int(m.get("step", 0)), float(m.get("loss_first_mean", float("nan"))),
                     float(m.get("loss_last_mean", float("nan"))), wall, dict(m))


def export_artifact(checkpoint: ray.train.Checkpoint, dest: str) -> str:
    """Copy the checkpoint's `artifact/` to `dest`; on local disk the swap is atomic."""
    fs, src = checkpoint.filesystem, f"{checkpoint.path}/{ARTIFACT_DIR}"
    if fs.get_file_info(src).type != pafs.FileType.Directory:
        raise TrainingError(f"final checkpoint {checkpoint.path} holds no {ARTIFACT_DIR}/")
    if "://" in dest:
        pafs.copy_files(src, dest, source_filesystem=fs)
        return dest
    tmp = Path(f"{dest}.tmp-{uuid.uuid4().hex[:8]}")
    with checkpoint.as_directory() as local:
        shutil.copytree(Path(local) / ARTIFACT_DIR, tmp)
    old = Path(f"{dest}.old-{uuid.uuid4().hex[:8]}")
    if Path(dest).exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


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
