"""The Ray edge of `diffray tune`: a Tune experiment whose trials are the method's own Ray Train runs.

Each trial is a small Tune function (no CPU of its own) that builds the method's `TorchTrainer` with the
trial's config and reports its validation steps to Tune from its own thread (`reporting.py`); its workers
take `scaling.*` resources like any training job.
The datasets are built and materialized once on the driver and shared by every trial. Every validation
step reports `val_loss` (held-out rows, fixed noise and timesteps), which the scheduler (ASHA by default)
compares at its rungs. Rerunning the same experiment name restores it with `Tuner.restore`: finished
trials are kept, unfinished ones resume from their own last checkpoint; only with the settings it was
started with, and only when Tune's files in it are whole (`results.check_resume`, before Ray starts).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass
from typing import Any

import ray.train
import yaml
from ray import tune

from diffray import logs, storage
from diffray.cluster import (alive_nodes, check_resources, connect_ray, forwarded_env, nodes_are_added,
                             workers_that_fit)
from diffray.config import TrackingSection
from diffray.errors import ConfigError, DiffrayError
from diffray.methods import method_of
from diffray.trainers.checkpoints import repair_snapshot
from diffray.trainers.datasets import build_datasets
from diffray.trainers import tracking
from diffray.trainers.progress import RunStatus
from diffray.trainers.loop import upload_logs
from diffray.trainers.runner import build_trainer, check_storage, export_artifact, fit_checked, logs_uri, run_dirs
from diffray.tune.config import TuneJob, rungs
from diffray.tune.results import TrialRow, check_resume, collect_rows, save_job, write_report
from diffray.tune.schedulers import build_scheduler
from diffray.tune.space import param_space, resolve_params, trial_config

# A trial's driver only builds a trainer and waits on its worker group: no CPU, a little memory.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 2**20}
TRAIN_RUNS_DIR = "train_runs"
BEST_DIR = "best"


class SearchInterrupted(DiffrayError):
    """The search stopped (Ctrl-C) before every trial ended; its state is saved and a rerun resumes it."""

    exit_code = 130


@dataclass
class TuneOutcome:
    exp_dir: str
    rows: list[TrialRow]
    best: TrialRow | None
    best_artifact: str | None
    best_config: str | None
    concurrency: int
    wall_time_s: float
    restored: bool


def run_trial(params: dict[str, Any], *, base: dict[str, Any], domains, datasets: dict[str, Any],
              model_path: str, exp_dir: str, driver_env: dict[str, str], rung_steps: tuple[int, ...] = ()) -> None:
    """One trial (inside Tune's trial actor): the method's TorchTrainer on this trial's config.
    `rung_steps` (synchronous halving's rungs) are added to the run's checkpoint steps: a trial paused at a
    rung restarts this function, and its Train run of the same name resumes from the rung's checkpoint.
    `driver_env` (`diffray.cluster.forwarded_env()`: Ray Train's settings, DIFFRAY_HOOK*/verbose variables)
    goes on to the trial's workers as it does in `diffray train`: the trial actor does not inherit the
    driver's environment."""
    from ray.util.queue import Queue

    from diffray.tune.reporting import ForwardReports, fit_reporting

    os.environ.update(driver_env)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, resolve_params(domains, params))
    train = cfg.train.model_copy(update={"checkpoint_steps": sorted({*cfg.train.checkpoint_steps, *rung_steps})})
    cfg = cfg.model_copy(update={
        "train": train,
        "run": cfg.run.model_copy(update={"name": f"trial-{trial_id}", "storage_path": f"{exp_dir}/{TRAIN_RUNS_DIR}"}),
        "tracking": TrackingSection()})  # the Tune logger callbacks track trials (one run each), not the workers
    run_dir, log_dir = run_dirs(cfg)
    repair_snapshot(run_dir)  # a resumed trial's Ray snapshot, torn or listing deleted checkpoints, as in `train`
    status = RunStatus.remote()
    reports = Queue(actor_options={"num_cpus": 0})
    trainer = build_trainer(cfg, model_path, datasets, log_dir, status, callbacks=[ForwardReports(reports)],
                            report_validation=True, logs_uri=logs_uri(run_dir))
    fit_reporting(lambda: fit_checked(trainer, status, f"trial {trial_id}", log_dir), reports, tune.report)


def trial_concurrency(job: TuneJob, autoscaled: bool = False) -> int:
    """Trials that run at once: worker groups the alive nodes hold, and for DDPO also the CPUs of each
    trial's reward actors (capped by tune.max_concurrent_trials). On an `autoscaled` cluster the alive
    nodes are no limit: every trial (or tune.max_concurrent_trials) asks, and the autoscaler adds nodes."""
    cfg, s = job.train, job.train.scaling
    if autoscaled:
        return job.tune.max_concurrent_trials or job.num_trials
    nodes = alive_nodes()
    fit = max(1, workers_that_fit(s.worker_bundle(), nodes) // s.num_workers)
    side = method_of(cfg.method).side_cpus
    if side is not None and side(cfg):
        per_trial = s.num_workers * s.cpus_per_worker + side(cfg)
        fit = max(1, min(fit, int(sum(n.get("CPU", 0) for n in nodes) // per_trial)))
    return min(fit, job.tune.max_concurrent_trials or fit)


def sha_rungs(job: TuneJob) -> list[int]:
    """The rung steps trials checkpoint at for synchronous halving (none for the other schedulers)."""
    s = job.tune.scheduler
    return rungs(s.grace_period, s.reduction_factor, s.max_t or job.max_steps) if s.name == "sha" else []


def build_searcher(job: TuneJob):
    """None (Tune's variant generator: grid and random search) or Optuna's TPE sampler, seeded by run.seed."""
    if job.tune.search != "tpe":
        return None
    try:
        from ray.tune.search.optuna import OptunaSearch
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("search: tpe needs optuna: pip install 'diffray[tpe]'", field="tune.search") from None
    return OptunaSearch(metric=job.tune.metric, mode=job.tune.mode, seed=job.train.run.seed)


class TrialEnded(tune.Callback):
    """Tune callback on the driver: `on_trial(trial_id, last result, "ended" | "failed")` per trial."""

    def __init__(self, on_trial):
        self.on_trial = on_trial

    def __getstate__(self):  # Tune saves its run config with the experiment: the console stays behind
        return {"on_trial": None}

    def on_trial_complete(self, iteration, trials, trial, **info):
        if self.on_trial is not None:
            self.on_trial(trial.trial_id, trial.last_result, "ended")

    def on_trial_error(self, iteration, trials, trial, **info):
        if self.on_trial is not None:
            self.on_trial(trial.trial_id, trial.last_result, "failed")


def run_tune(job: TuneJob, on_trial=None) -> TuneOutcome:
    """Run (or resume) the experiment, write the results table and plots, export the best trial.
    `on_trial(trial_id, result, how)` runs on the driver as each trial ends (the CLI prints a line).

    The job (after overrides) is saved beside the experiment so `diffray tune results DIR` reads the
    experiment back without the original file.

    Raises:
        SearchInterrupted: the search was stopped (Ctrl-C) before every trial ended; the results so far are
            written, no best is exported, and a rerun resumes it.
    """
    from diffray.models.loading import resolve_model_path

    t0 = time.time()
    cfg = job.train
    model_path = resolve_model_path(cfg.model.path)
    method_of(cfg.method).check(cfg, model_path)
    root = storage.absolute(cfg.run.storage_path)
    exp_dir = storage.join(root, job.name)
    check_storage(exp_dir)
    check_resume(job, exp_dir)
    connect_ray()
    check_resources(cfg.scaling)
    restored = tune.Tuner.can_restore(exp_dir)
    datasets = build_datasets(cfg, model_path, storage.local_dir(exp_dir, "data-reports"))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=job.base, domains=job.domains, datasets=datasets,
                             model_path=model_path, exp_dir=exp_dir,
                             driver_env=forwarded_env(), rung_steps=tuple(sha_rungs(job))),
        TRIAL_DRIVER_RESOURCES)
    concurrency = trial_concurrency(job, autoscaled=nodes_are_added(cfg.scaling))
    if restored:
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = new_tuner(job, trainable, root, concurrency, on_trial)
        save_job(job, exp_dir)
    try:
        with quiet_tune_output():
            tuner.fit()
    finally:
        if storage.is_uri(exp_dir):  # the data reports and trackers' local stores, beside the experiment
            upload_logs(storage.local_dir(exp_dir), exp_dir)
    # Ray's W&B callback stops its logging actors in __del__; left to interpreter exit, it finds the `ray`
    # module torn down and prints an AttributeError. Collected here, while Ray is up.
    del tuner, trainable
    gc.collect()
    rows = collect_rows(exp_dir, job)  # read back from the directory, as `diffray tune results` does
    unfinished = job.num_trials - sum(r.status not in ("running", "pending") for r in rows)
    if unfinished > 0:  # Tune ends fit() quietly on Ctrl-C (SIGINT/SIGUSR1): not a finished search
        write_report(rows, job, exp_dir)
        raise SearchInterrupted(
            f"the search of {exp_dir} was interrupted with {unfinished} of its {job.num_trials} trials unfinished "
            f"(no best exported; the finished ones are in {exp_dir}/results.csv): rerun the same command to resume "
            "it, finished trials are kept")
    best = next((r for r in rows if r.status == "completed"), None)
    artifact = config_path = None
    if best is not None:
        artifact, config_path = export_best(job, best, exp_dir)
    write_report(rows, job, exp_dir)
    return TuneOutcome(exp_dir, rows, best, artifact, config_path, concurrency, time.time() - t0, restored)


@contextlib.contextmanager
def quiet_tune_output():
    """Tune's terminal output off unless verbose: Ray 2.60's output engine prints its experiment box, the results
    folder and a TensorBoard command under /tmp/ray even at `verbose=0` (its `experiment_started` checks no
    verbosity); the legacy engine, at verbose 0, prints nothing. diffray prints its own lines and table."""
    if logs.verbose() or "RAY_AIR_NEW_OUTPUT" in os.environ:
        yield
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        os.environ.pop("RAY_AIR_NEW_OUTPUT", None)


def new_tuner(job: TuneJob, trainable, root: str, concurrency: int, on_trial) -> tune.Tuner:
    """The Tuner of a new experiment: the space (grid points shuffled by run.seed unless disabled), metric,
    scheduler, searcher and concurrency; Tune's own table printing only when verbose."""
    return tune.Tuner(
        trainable, param_space=param_space(job.domains, job.train.run.seed if job.tune.shuffle_grid else None),
        tune_config=tune.TuneConfig(metric=job.tune.metric, mode=job.tune.mode,
                                    scheduler=build_scheduler(job, storage.join(root, job.name), concurrency),
                                    search_alg=build_searcher(job), num_samples=job.tune.num_samples,
                                    # sha caps running trials itself: Tune's cap counts paused trials as live
                                    max_concurrent_trials=None if job.tune.scheduler.name == "sha" else concurrency),
        run_config=tune.RunConfig(name=job.name, storage_path=root,
                                  callbacks=([TrialEnded(on_trial)] if on_trial else []) + tracking.tune_callbacks(
                                      job.train.tracking, job.name, storage.local_dir(storage.join(root, job.name))),
                                  verbose=None if logs.verbose() else 0,
                                  failure_config=tune.FailureConfig(max_failures=job.tune.max_failures)))


def export_best(job: TuneJob, best: TrialRow, exp_dir: str) -> tuple[str, str]:
    """The best finished trial's artifact (from its final checkpoint) and its config as a runnable YAML."""
    fs, _ = storage.resolve(exp_dir)
    checkpoint = ray.train.Checkpoint(best.checkpoint_path, filesystem=fs)
    artifact = export_artifact(checkpoint, f"{exp_dir}/{BEST_DIR}/artifact")
    data = trial_config(job.base, best.params).model_dump(mode="json")
    data["run"]["name"] = f"{job.name}-best"
    header = (f"# diffray train {exp_dir}/{BEST_DIR}/config.yaml\n# The best trial ({best.trial_id}) of Tune "
              f"experiment {job.name}: {job.tune.metric}={best.metric:.6g} at step {best.steps}.\n")
    config_path = f"{exp_dir}/{BEST_DIR}/config.yaml"
    storage.write_text(config_path, header + yaml.safe_dump(data, sort_keys=False))
    return artifact, config_path
