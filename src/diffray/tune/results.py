"""A Tune experiment's results read back from its directory: the trial table (printed, CSV, Parquet) and
plots of the metric against steps and against the searched values. Used after `diffray tune` finishes
and by `diffray tune results DIR`, which needs only the directory (the job YAML is saved in it).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import pickletools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from diffray import storage
from diffray.errors import ConfigError

JOB_FILE = "tune_job.yaml"
TUNER_FILE = "tuner.pkl"  # Tune's saved Tuner, written once as a search starts; Tuner.restore unpickles it
STATE_FILES = "experiment_state-*.json"  # Tune's CKPT_FILE_TMPL; it reads the newest by name
STOPS_DIR = "scheduler_stops"  # <trial_id>.json per trial the scheduler stopped at a rung (written by the runner)
STATUS_ORDER = {"completed": 0, "stopped early": 1, "running": 2, "pending": 3, "error": 4}
log = logging.getLogger(__name__)


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str                        # completed | stopped early (by the scheduler) | running | pending | error
    steps: int                         # the last reported step
    metric: float                      # the metric at that step (nan when none was reported)
    best_metric: float                 # the best value it reported at any step
    checkpoint_path: str | None = None
    error: str | None = None
    history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def stopped_early(self) -> bool:
        return self.status == "stopped early"


def collect_rows(exp_dir: str, job) -> list[TrialRow]:
    """Every trial of the experiment in `exp_dir`, best first (finished trials before stopped ones)."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    if tune_state(exp_dir) is None:
        raise ConfigError(f"{exp_dir}: no trial results yet (the experiment never started or was stopped before "
                          "Tune saved its state)")
    analysis = ExperimentAnalysis(exp_dir, default_metric=job.tune.metric, default_mode=job.tune.mode)
    frames = analysis.trial_dataframes
    errors = {r.path: r.error for r in ResultGrid(analysis)}
    rows = [_row(trial, job, frames.get(trial.trial_id), errors.get(trial.path),
                 storage.exists(stop_marker(exp_dir, trial.trial_id))) for trial in analysis.trials]
    sign = 1.0 if job.tune.mode == "min" else -1.0
    rows.sort(key=lambda r: (STATUS_ORDER[r.status], _nan_last(sign * r.metric)))
    return rows


def tune_state(exp_dir: str) -> str | None:
    """The experiment state that Tune restores and results are read from: the newest `experiment_state-*.json`
    (Tune writes one once trials are running), checked to be one Ray can read; None when there is none.

    Raises:
        ConfigError: the file is torn or not Tune's, naming it and what to do. Ray would fail on it with a
            bare JSONDecodeError (results), or log it and start the whole search anew (a resume).
    """
    fs, base = storage.resolve(exp_dir)
    if fs.get_file_info(base).type != pafs.FileType.Directory:  # a search not started yet
        return None
    names = sorted(i.base_name for i in storage.list_files(fs, base) if fnmatch.fnmatchcase(i.base_name, STATE_FILES))
    if not names:
        return None
    problem = _state_problem(storage.read_or_none(fs, f"{base}/{names[-1]}"))
    if problem is None:
        return storage.join(exp_dir, names[-1])
    older = next((n for n in reversed(names[:-1]) if _state_problem(storage.read_or_none(fs, f"{base}/{n}")) is None),
                 None)
    back = f"delete it to go back to Tune's previous state {older}, " if older else ""
    raise ConfigError(f"{storage.join(exp_dir, names[-1])}: Tune's experiment state cannot be read ({problem}): if its "
                      f"search is still running, try again in a moment; else {back}restore the file from a copy, or "
                      f"delete {exp_dir} to start the search anew")


def _state_problem(data: bytes | None) -> str | None:
    """Why Tune could not read a state file's bytes, or None when it could."""
    if data is None:
        return "the file cannot be read"
    if not data.strip():
        return "the file is empty"
    try:
        state = json.loads(data)
    except ValueError as exc:  # JSONDecodeError (a torn write), or bytes that are not UTF-8
        return f"not JSON: {exc}"
    if not (isinstance(state, dict) and isinstance(state.get("trial_data"), list)
            and isinstance(state.get("runner_data"), dict)):
        return "no trial_data and runner_data in it"
    return None


def check_tuner_file(exp_dir: str, results_kept: bool) -> None:
    """Tune's saved Tuner (`tuner.pkl`) checked to be a whole pickle before `Tuner.restore` unpickles it: by its
    opcodes (`pickletools.genops`), never by running it. Nothing to check when there is none in a new search (one
    with saved trials has lost it: refused).
    `results_kept`: the experiment has Tune state and its saved job, so `diffray tune results` reads it.

    Raises:
        ConfigError: the file is torn (a crash while Tune wrote it), naming it and what to do. Ray would fail on
            it with a bare UnpicklingError or EOFError after building the datasets.
    """
    fs, base = storage.resolve(exp_dir)
    if fs.get_file_info(f"{base}/{TUNER_FILE}").type == pafs.FileType.NotFound:
        if results_kept:  # deleted: Tune would start a new search in the folder, beside the old one's trials
            raise ConfigError(f"{storage.join(exp_dir, TUNER_FILE)} is missing beside the search's saved trials, so it "
                              f"cannot be resumed: its trials' results stay readable with `diffray tune results "
                              f"{exp_dir}`; to search again, move {exp_dir} aside or give a new tune.name")
        return
    problem = _pickle_problem(storage.read_or_none(fs, f"{base}/{TUNER_FILE}"))
    if problem is None:
        return
    then = (f"its trials' results stay readable with `diffray tune results {exp_dir}`; to search again, move "
            f"{exp_dir} aside (its results can be read there too) or give a new tune.name" if results_kept else
            f"no trial results were saved: delete {exp_dir}, or give a new tune.name, to start the search anew")
    raise ConfigError(f"{storage.join(exp_dir, TUNER_FILE)}: Tune's saved search is damaged ({problem}), so it "
                      f"cannot be resumed: {then}")


def _pickle_problem(data: bytes | None) -> str | None:
    """Why a pickle's bytes are not a whole pickle (a truncated write), or None when they are."""
    if data is None:
        return "the file cannot be read"
    if not data:
        return "the file is empty"
    try:
        for _ in pickletools.genops(data):  # reads the opcodes only; raises at the end of a stream cut short
            pass
    except ValueError as exc:  # UnicodeDecodeError included (a string cut mid-character)
        return f"not a whole pickle: {exc}"
    return None


def stop_marker(exp_dir: str, trial_id: str) -> str:
    """The file that records that the scheduler stopped `trial_id` at a rung."""
    return storage.join(exp_dir, STOPS_DIR, f"{trial_id}.json")


def target_steps(job) -> int:
    """The step a trial that is not stopped runs to: ASHA's or SHA's max_t (the last rung), else train.max_steps."""
    s = job.tune.scheduler
    return (s.max_t or job.max_steps) if s.name in ("asha", "sha") else job.max_steps


def _row(trial, job, frame, err, stopped: bool) -> TrialRow:
    from diffray.tune.space import resolve_params

    metric, sign = job.tune.metric, (1.0 if job.tune.mode == "min" else -1.0)
    last = trial.last_result or {}
    history = _history(frame, metric)
    steps = int(last.get("step", 0) or 0)
    error = str(err).strip().splitlines()[-1] if err else None
    status = _status(trial.status, steps, target_steps(job), err is not None, stopped)
    if status == "error" and error is None:
        error = (f"ended at step {steps} of {target_steps(job)} without an error and without a scheduler stop"
                 if trial.status == "TERMINATED" else f"Tune status {trial.status}")
    values = [v for _, v in history]
    return TrialRow(
        trial.trial_id, resolve_params(job.domains, trial.config), status, steps,
        float(last.get(metric, math.nan)) if history else math.nan,
        (min(values, key=lambda v: sign * v) if values else math.nan),
        last.get("checkpoint_path"), error, history)


def _history(df, metric: str) -> list[tuple[int, float]]:
    if df is None or df.empty or metric not in df or "step" not in df:
        return []
    df = df[["step", metric]].dropna()
    return [(int(s), float(v)) for s, v in zip(df["step"], df[metric])]


def _status(tune_status: str, steps: int, target: int, errored: bool, stopped: bool) -> str:
    """A trial's status. "stopped early" only when the scheduler stopped it at a rung (`stopped`): a trial
    that crashed is an error, and one that ended short of `target` for any other reason is one too."""
    if errored or tune_status == "ERROR":
        return "error"
    if tune_status in ("RUNNING", "PENDING", "PAUSED"):
        return tune_status.lower() if tune_status != "PAUSED" else "pending"
    if stopped:
        return "stopped early"
    return "completed" if steps >= target else "error"


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def to_table(rows: list[TrialRow], metric: str) -> pa.Table:
    """One row per trial: trial_id, each searched path, metric, best metric, steps, status, stopped_early."""
    paths = list(rows[0].params) if rows else []
    cols: dict[str, list] = {"trial_id": [r.trial_id for r in rows]}
    for p in paths:
        cols[p] = _param_column([r.params.get(p) for r in rows])
    cols[metric] = [r.metric for r in rows]
    cols[f"best_{metric}"] = [r.best_metric for r in rows]
    cols["steps"] = [r.steps for r in rows]
    cols["status"] = [r.status for r in rows]
    cols["stopped_early"] = [r.stopped_early for r in rows]
    cols["error"] = [r.error for r in rows]
    return pa.table(cols)


def _param_column(values: list[Any]) -> list[Any]:
    """A searched path's values as one Arrow type. Lists, mappings (`lora.target_modules: {grid: [[to_q], ...]}`)
    and mixed types (`{choice: [4, auto]}`) become their compact JSON text: a CSV has no list type, and Arrow
    none for a column of ints and strings."""
    kinds = {type(v) for v in values if v is not None}
    if kinds <= {int, float} or (len(kinds) == 1 and not kinds & {list, dict}):
        return values
    return [None if v is None else json.dumps(v, separators=(",", ":")) for v in values]


def format_table(rows: list[TrialRow], metric: str) -> str:
    """The table as aligned text, best first, then a line per failed trial with its error (its first line)."""
    table = to_table(rows, metric).drop(["error"])
    header = table.column_names
    body = [[_fmt(v) for v in row.values()] for row in table.to_pylist()]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    lines += [f"trial {r.trial_id} failed: {r.error.strip().splitlines()[0][:300]}" for r in rows
              if r.error and r.error.strip()]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def write_report(rows: list[TrialRow], job, exp_dir: str) -> dict[str, str]:
    """results.csv, results.parquet and plots/ in the experiment dir; returns {what: path}."""
    table = to_table(rows, job.tune.metric)
    out = {"csv": f"{exp_dir}/results.csv", "parquet": f"{exp_dir}/results.parquet"}
    fs, base = storage.resolve(exp_dir)
    fs.create_dir(base, recursive=True)
    pq.write_table(table, f"{base}/results.parquet", filesystem=fs)
    with fs.open_output_stream(f"{base}/results.csv") as f:
        pacsv.write_csv(table, f)
    if not storage.is_uri(exp_dir):
        out.update(plot_results(rows, job, Path(exp_dir) / "plots"))
    return out


def plot_results(rows: list[TrialRow], job, out_dir: Path) -> dict[str, str]:
    """metric_vs_step.png (every trial) and metric_vs_params.png (finished trials, one panel per path)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = job.tune.metric
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.history:
            steps, values = zip(*r.history)
            ax.plot(steps, values, marker=".", linestyle="-" if r.status == "completed" else "--",
                    label=f"{r.trial_id} " + " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in r.params.items()))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{job.name}: {metric} per trial (dashed: stopped early)")
    if any(r.history for r in rows):  # no trial has reported yet: no line to name (matplotlib warns on an empty one)
        ax.legend(fontsize=6)
    fig.tight_layout()
    step_png = out_dir / "metric_vs_step.png"
    fig.savefig(step_png, dpi=100)
    plt.close(fig)

    finished = [r for r in rows if r.status == "completed"]
    numeric = [d.path for d in job.domains if d.kind != "same_as"
               and all(isinstance(r.params.get(d.path), (int, float)) for r in finished)]
    fig, axes = plt.subplots(1, max(1, len(numeric)), figsize=(4 * max(1, len(numeric)), 3.5), squeeze=False)
    for ax, path in zip(axes[0], numeric):
        xs = [r.params[path] for r in finished]
        ax.scatter(xs, [r.metric for r in finished])
        if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(path)
        ax.set_ylabel(metric)
    fig.suptitle(f"{job.name}: final {metric} of finished trials")
    fig.tight_layout()
    params_png = out_dir / "metric_vs_params.png"
    fig.savefig(params_png, dpi=100)
    plt.close(fig)
    return {"plot_steps": str(step_png), "plot_params": str(params_png)}


def read_experiment(exp_dir: str):
    """(job, rows) of a finished or interrupted experiment dir written by `diffray tune`. A saved job that today's
    rules on setting up a search refuse (`check_job`) is read as it ran, with a warning naming the rule."""
    from diffray.tune.config import check_job, load_saved_job

    exp_dir = storage.absolute(exp_dir)  # Tune reads experiment dirs by absolute path or URI
    job_file = storage.join(exp_dir, JOB_FILE)
    if not storage.exists(job_file):
        raise ConfigError(f"{exp_dir} is not a diffray tune experiment (no {JOB_FILE})", field="DIR")
    job = load_saved_job(_local_job_file(exp_dir))
    try:
        if job.refused:
            raise ConfigError(f"its training config: {job.refused}")
        check_job(job.base, job.train, job.tune, job.domains)
    except ConfigError as exc:
        log.warning("%s: this search was set up in a way diffray refuses now (%s); its results are read as it ran",
                    job_file, exc)
    return job, collect_rows(exp_dir, job)


def _local_job_file(exp_dir: str) -> str:
    job_file = storage.join(exp_dir, JOB_FILE)
    if storage.is_uri(job_file):  # the YAML loader reads local files: a copy beside the local logs
        job_file = storage.write_text(storage.local_dir(exp_dir, JOB_FILE), storage.read_text(job_file))
    return job_file


def save_job(job, exp_dir: str) -> None:
    """Keep the job (after overrides) beside the experiment: `diffray tune results DIR` reads it back, and a
    rerun is checked against it (`check_resume`)."""
    import yaml

    storage.write_text(storage.join(exp_dir, JOB_FILE),
                       yaml.safe_dump({**job.base, "tune": job.tune.model_dump(mode="json")}, sort_keys=False))


def check_resume(job, exp_dir: str) -> None:
    """A rerun of an experiment that Tune saved state for restores it: Tune keeps its own space, search,
    scheduler and trials, and the unfinished trials go on from their checkpoints with the rerun's training
    config. So it may change only what a training rerun may (`trainers.rerun.FREE`, the same global batch),
    not `train.max_steps` (the trials' budget) nor anything under `tune`. An experiment without Tune state
    (stopped before its trials ran) starts anew and passes.

    Raises:
        ConfigError: naming `tune.name`, the experiment's folder and the settings that differ; naming the saved
            job's setting that diffray refuses now (`check_job`); or naming Tune's state file or its saved Tuner
            when it cannot be read (`tune_state`, `check_tuner_file`), before Ray would start on it.
    """
    from diffray.trainers.rerun import differences, shown
    from diffray.tune.config import check_job, load_saved_job

    state, saved = tune_state(exp_dir), storage.exists(storage.join(exp_dir, JOB_FILE))
    check_tuner_file(exp_dir, results_kept=state is not None and saved)
    if state is None or not saved:
        return
    try:
        before = load_saved_job(_local_job_file(exp_dir))
    except ConfigError as exc:
        raise ConfigError(f"{storage.join(exp_dir, JOB_FILE)} is not the job this experiment was started with "
                          f"({exc}): restore it, or give a new tune.name", field="tune.name") from None
    try:  # saved by an older diffray, before a rule it breaks: Tune would resume it as it was set up
        if before.refused:
            raise ConfigError(f"its training config: {before.refused}")
        check_job(before.base, before.train, before.tune, before.domains)
    except ConfigError as exc:
        raise ConfigError(f"experiment {exp_dir} was started with a setting diffray refuses now, so it cannot be "
                          f"resumed ({exc}). Its trials' results stay readable with `diffray tune results {exp_dir}`; "
                          "to search again, fix the setting and give a new tune.name") from None

    def settings(j) -> dict[str, Any]:
        return {**j.train.model_dump(mode="json"), "tune": j.tune.model_dump(mode="json")}

    changed = differences(settings(before), settings(job), may_extend=False)
    if changed:
        raise ConfigError(f"experiment {exp_dir} was started with other settings: {shown(changed)}. A rerun "
                          "resumes the experiment as Tune saved it, so only with its settings: restore them, or "
                          "give a new tune.name", field="tune.name")

