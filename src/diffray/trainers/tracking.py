"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases, opened on rank 0 through Ray's
own integrations (`setup_mlflow`, `setup_wandb`) as `tracking:` asks.

Each tracker receives what TensorBoard receives (the same `train/<name>` metric names at the same
steps, the validation grids) plus the resolved config as params and, at the end, the artifact dir with
its card. A tracker must never break a run: any error from it (an unreachable server, a full disk) is
logged once as a warning and that tracker is switched off for the rest of the run. The libraries are
imported only when the config asks for them; a missing one is a `ConfigError` naming the extra.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from diffray.errors import ConfigError

log = logging.getLogger(__name__)
EXTRA = "pip install 'diffray[tracking]'"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: MLflow params are flat, and dotted keys match our overrides."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def require(module: str) -> None:
    """Fail with the extra to install when a tracker's library is missing (checked on the driver too)."""
    try:
        __import__(module)
    except ImportError:
        raise ConfigError(f"tracking.{module} needs the {module} package: {EXTRA}", field=f"tracking.{module}") from None


def check(tracking) -> None:
    """ConfigError before anything starts when a configured tracker's library is missing (driver side)."""
    for name in ("mlflow", "wandb"):
        if getattr(tracking, name) is not None:
            require(name)


def mlflow_store(section, log_dir: str) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment): the default is a SQLite store in the log dir."""
    if section.tracking_uri:
        return section.tracking_uri, None
    root = Path(log_dir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlflow-artifacts").as_uri()


class _Tracker:
    """One backend; `call` runs a logging call and turns its first failure into a warning + off switch."""

    name = ""

    def __init__(self):
        self.on = True

    def call(self, what: str, fn) -> None:
        """Run `fn()` (a closure, so nothing of a tracker that failed to open is touched) unless off."""
        if not self.on:
            return
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
            self.on = False
            log.warning("%s tracking is off for the rest of this run: %s failed: %s", self.name, what, exc)


class MlflowTracker(_Tracker):
    name = "mlflow"

    def __init__(self, section, run_name: str, params: dict[str, Any], log_dir: str):
        super().__init__()
        self.mlflow = None
        from ray.air.integrations.mlflow import setup_mlflow

        uri, artifacts = mlflow_store(section, log_dir)
        self.call("setup_mlflow", lambda: self._setup(setup_mlflow, flatten(params), uri, section.experiment,
                                                      artifacts, run_name))

    def _setup(self, setup_mlflow, params, uri, experiment, artifacts, run_name) -> None:
        self.mlflow = setup_mlflow(params, tracking_uri=uri, experiment_name=experiment, run_name=run_name,
                                   artifact_location=artifacts, create_experiment_if_not_exists=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.call("log_metrics", lambda: self.mlflow.log_metrics(values, step=step))

    def image(self, tag: str, step: int, image) -> None:
        self.call("log_image", lambda: self.mlflow.log_image(image, key=tag, step=step))

    def artifact(self, path: Path) -> None:
        self.call("log_artifacts", lambda: self.mlflow.log_artifacts(str(path), artifact_path="artifact"))

    def close(self) -> None:
        self.call("end_run", lambda: self.mlflow.end_run())


class WandbTracker(_Tracker):
    name = "wandb"

    def __init__(self, section, run_name: str, params: dict[str, Any], log_dir: str):
        super().__init__()
        self.run = None
        # Offline must never prompt for a login or touch the network: the mode goes into the environment
        # too, because Ray's key lookup and wandb's own settings both read WANDB_MODE.
        os.environ["WANDB_MODE"] = section.mode
        os.environ.setdefault("WANDB_SILENT", "true")
        out = Path(section.dir or log_dir).absolute()
        out.mkdir(parents=True, exist_ok=True)
        from ray.air.integrations.wandb import setup_wandb

        self.call("setup_wandb", lambda: self._setup(setup_wandb, params, section, run_name, str(out)))

    def _setup(self, setup_wandb, params, section, run_name, out) -> None:
        self.run = setup_wandb(params, project=section.project, mode=section.mode, dir=out, name=run_name,
                               trial_id=None, trial_name=run_name, resume=None)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.call("log", lambda: self.run.log(values, step=step))

    def image(self, tag: str, step: int, image) -> None:
        import wandb

        self.call("log image", lambda: self.run.log({tag: wandb.Image(image)}, step=step))

    def artifact(self, path: Path) -> None:
        import wandb

        def log_artifact():
            art = wandb.Artifact(f"{self.run.name}-artifact", type="model")
            art.add_dir(str(path))
            self.run.log_artifact(art)

        self.call("log_artifact", log_artifact)

    def close(self) -> None:
        self.call("finish", lambda: self.run.finish())


def open_trackers(tracking, run_name: str, params: dict[str, Any], log_dir: str) -> list[_Tracker]:
    """The trackers `tracking` (a `TrackingSection`) asks for, opened (rank 0 only calls this)."""
    out: list[_Tracker] = []
    for name, cls in (("mlflow", MlflowTracker), ("wandb", WandbTracker)):
        section = getattr(tracking, name)
        if section is not None:
            require(name)
            out.append(cls(section, run_name, params, log_dir))
    return out


def tune_callbacks(tracking, experiment_name: str, local_dir: str) -> list:
    """Ray Tune's logger callbacks for `diffray tune` (one tracker run per trial, from the driver, with
    each trial's params and every reported result); the trials' own workers then log nothing.
    `local_dir`: where the default stores go (the experiment's local dir)."""
    out: list = []
    if tracking.mlflow is not None:
        require("mlflow")
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri, artifacts = mlflow_store(tracking.mlflow, local_dir)
        if artifacts is not None:  # the callback cannot place artifacts: create the experiment ourselves
            ensure_experiment(uri, tracking.mlflow.experiment, artifacts)
        out.append(MLflowLoggerCallback(uri, experiment_name=tracking.mlflow.experiment,
                                        tags={"diffray.tune": experiment_name}, save_artifact=False))
    if tracking.wandb is not None:
        require("wandb")
        from ray.air.integrations.wandb import WandbLoggerCallback

        section = tracking.wandb
        os.environ["WANDB_MODE"] = section.mode  # Ray's key lookup skips the login when offline
        out_dir = Path(section.dir or local_dir).absolute()
        out_dir.mkdir(parents=True, exist_ok=True)
        out.append(WandbLoggerCallback(project=section.project, group=experiment_name, mode=section.mode,
                                       dir=str(out_dir)))
    return out


def ensure_experiment(uri: str, name: str, artifact_location: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifact_location)
