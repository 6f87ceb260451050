"""A Tune job's YAML: a training config of any method plus a `tune:` section (space, metric, scheduler,
search). Loading validates both halves and every value the space can produce before Ray starts.

    method: lora
    ...                      # the training config every trial starts from
    tune:
      space: {lora.rank: {grid: [4, 8, 16, 32]}, optim.lr: {grid: [1.0e-4, 1.0e-3]}}
      scheduler: {name: asha, grace_period: 10}

Like `diffray.config`, this module never touches Ray or the environment.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from diffray.config import (RUN_NAME_PATTERN, Section, TrainConfig, apply_overrides, deep_copy, read_yaml,
                            validate_as)
from diffray.methods import method_of, validate_config
from diffray.errors import ConfigError
from diffray.tune.space import Domain, check_space, parse_space

# Trials share one set of datasets and one resource shape, so the space may not touch these sections.
FIXED_SECTIONS = ("method", "run", "model", "data", "scaling")
# What every trial of a dataset method reports (`session.summary_metrics`), each with the mode it is optimised
# in (all losses: lower is better); a method with a `step_metric` (DDPO) reports that one instead.
TRIAL_METRICS = {"val_loss": "min", "loss": "min", "loss_first_mean": "min", "loss_last_mean": "min"}
# Settings of the rung schedulers, which fifo (no rungs: every trial runs to train.max_steps) would ignore.
RUNG_SETTINGS = ("grace_period", "reduction_factor", "max_t")
SPACE_PREFIX = "tune.space."


class SchedulerSection(Section):
    name: Literal["asha", "sha", "fifo"] = Field(
        "asha", description="asha: stop poor trials early at rungs, each judged against the trials that reached the "
        "rung before it (never waits; for large searches); sha: synchronous successive halving, each rung judged "
        "once all its trials reported (trials pause at a rung and resume from its checkpoint; the fewest "
        "trial-steps on small searches); fifo: run every trial to train.max_steps.")
    grace_period: int = Field(10, ge=1, description="asha/sha: steps every trial runs before it can be stopped "
                              "(the first rung).")
    reduction_factor: float = Field(3.0, gt=1, description="asha/sha: 1/reduction_factor of trials go on at each "
                                    "rung (rungs at grace_period x reduction_factor^k).")
    max_t: int | None = Field(None, ge=1, description="asha/sha: the step the surviving trials run to; "
                              "None = train.max_steps.")


class TuneSection(Section):
    name: str | None = Field(None, pattern=RUN_NAME_PATTERN, description="Experiment name under run.storage_path; "
                             "None = run.name. Rerunning the same name resumes the experiment.")
    space: dict[str, Any] = Field(description="Config path -> Tune domain ({choice|grid|loguniform|uniform|"
                                  "randint: ...} or {same_as: other.path}).")
    metric: str = Field("val_loss", description="Reported metric to optimise (val_loss: held-out denoising loss).")
    mode: Literal["min", "max"] = Field("min", description="Minimise or maximise the metric.")
    search: Literal["grid", "random", "tpe"] = Field(
        "random", description="grid: every combination of grid domains (only grid domains allowed); random: grid "
        "domains expanded, the others sampled num_samples times (Tune's variant generator); tpe: Optuna's TPE "
        "(Bayesian) sampler proposes num_samples trials from the results so far (needs the `tpe` extra; no grid "
        "domains: use choice).")
    shuffle_grid: bool = Field(True, description="Run the grid points in a random order seeded by run.seed "
                               "(ASHA promotes the first trials to reach a rung; a grid written from small to "
                               "large values would run its worst points first). false: the order written.")
    num_samples: int = Field(1, ge=1, description="Repeats of the space (random search: samples per grid point; "
                             "tpe: trials in all).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="None = as many trials as the cluster's "
                                              "nodes hold worker groups for (scaling.* per trial).")
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    max_failures: int = Field(0, ge=0, description="Tune retries of a failed trial (inside a trial, "
                              "failure.max_failures restarts workers from the trial's checkpoint).")


@dataclass(frozen=True)
class TuneJob:
    base: dict[str, Any]        # the raw training config every trial starts from
    train: TrainConfig | None   # the validated base config; None only for a saved job (`refused` says why)
    tune: TuneSection
    domains: list[Domain]
    refused: str | None = None  # why today's diffray refuses a saved job's training config (`load_saved_job`)

    @property
    def name(self) -> str:
        if self.tune.name:
            return self.tune.name
        if self.train is not None:
            return self.train.run.name
        return str(_raw(self.base, "run", "name") or "search")

    @property
    def max_steps(self) -> int:
        if self.train is not None:
            return self.train.train.max_steps
        steps = _raw(self.base, "train", "max_steps")
        return steps if isinstance(steps, int) and not isinstance(steps, bool) else 0

    @property
    def num_trials(self) -> int:
        """Trials the experiment runs: num_samples, times the grid's points unless the search is TPE."""
        points = math.prod(len(d.args) for d in self.domains if d.kind == "grid")
        return self.tune.num_samples * (1 if self.tune.search == "tpe" else points)


def load_tune_job(path: str | Path, overrides: list[str] | None = None) -> TuneJob:
    """Load a Tune YAML, apply `a.b=c` overrides (`tune.*` ones included) and validate everything.

    Raises:
        ConfigError: naming the field (`tune.space.<path>`, `tune.scheduler.grace_period`, ...).
    """
    job = _parse_job(apply_tune_overrides(read_yaml(path), overrides or []))
    check_searched_overrides(overrides or [], job.tune.space)
    check_job(job.base, job.train, job.tune, job.domains)
    return job


def load_saved_job(path: str | Path) -> TuneJob:
    """The job an experiment was started with (`tune_job.yaml`, saved after overrides), read back for its results:
    its sections and space validated, but not the rules on how a search may be set up (`check_job`). An older
    diffray may have run a search those rules refuse now (a grid repeated, mode max on a loss, rung settings with
    fifo); its trials are still the ones it ran. A resume applies them (`results.check_resume`). A saved job has no
    overrides, so `check_searched_overrides` never applies to it.

    Its training config may be refused too (a setting an older diffray had, a limit added since): the job is then
    read with `train` None and `refused` naming the field, which is enough to read the trials' results (their
    space, metric and step budget) but not to resume them.

    Raises:
        ConfigError: naming the field of the `tune` section or space entry that cannot be read.
    """
    return _parse_job(read_yaml(path), saved=True)


def _parse_job(data: dict[str, Any], saved: bool = False) -> TuneJob:
    """The job's two halves validated on their own, and its space parsed; a `saved` job's training config may fail
    its validation (`load_saved_job`)."""
    if not isinstance(data.get("tune"), dict):
        raise ConfigError("a Tune job needs a `tune:` section with a `space`", field="tune")
    raw_tune = data.pop("tune")
    try:
        tune = validate_as(TuneSection, raw_tune)
    except ConfigError as exc:
        raise ConfigError(f"tune.{exc}") from None
    try:
        train = validate_config(data)
    except ConfigError as exc:
        if not saved:
            raise
        return TuneJob(data, None, tune, parse_space(tune.space), refused=str(exc))
    return TuneJob(data, train, tune, parse_space(tune.space))


def _raw(data: dict[str, Any], *keys: str) -> Any:
    """`data[k1][k2]...`, None where a level is missing or no mapping (a saved job's unvalidated config)."""
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data


def check_searched_overrides(overrides: list[str], space: dict[str, Any]) -> None:
    """A command-line value for a setting the space searches would be overwritten in every trial without a word.

    Raises:
        ConfigError: naming the override's path and the space entry that overwrites it.
    """
    for item in overrides:
        path = item.partition("=")[0].strip()
        entry = next((k for k in space if path == k or path.startswith(f"{k}.")), None)
        if entry is not None and not path.startswith("tune."):
            raise ConfigError(f"{path} is searched (tune.space.{entry}), which sets it in every trial, so this value "
                              f"would be ignored: change the space, or take the entry out with "
                              f"tune.space.{entry}=null to use one value", field=path)


def apply_tune_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`apply_overrides`, with two readings of tune's own keys:
    - `tune.space.<path>=V` sets the space's entry `<path>` whole: a space's keys are dotted config paths, which
      the generic override would nest (`tune.space.optim.lr` as space -> optim -> lr). `=null` takes the entry
      out of the space (trials then keep the config's value).
    - `tune.scheduler.name=fifo` switches the scheduler: the rung settings (asha/sha's) set before it, in the file
      or by earlier overrides, go with it; ones given after it stay, and fifo refuses them (`check_fifo`).
    """
    out = deep_copy(data)
    for item in overrides:
        path = item.partition("=")[0]
        if path.startswith(SPACE_PREFIX):
            _set_space_entry(out, path, item)
            continue
        out = apply_overrides(out, [item])
        scheduler = out["tune"].get("scheduler") if isinstance(out.get("tune"), dict) else None
        if path == "tune.scheduler.name" and isinstance(scheduler, dict) and scheduler.get("name") == "fifo":
            for name in RUNG_SETTINGS:
                scheduler.pop(name, None)
    return out


def _set_space_entry(out: dict[str, Any], path: str, item: str) -> None:
    """Set (or with null, remove) one entry of `out`'s tune.space from the override `item` of `path`."""
    value: Any = apply_overrides({}, [item])  # checks the form and reads the value as any override's
    for key in path.split("."):
        value = value[key]
    entry = path[len(SPACE_PREFIX):]
    tune = out.setdefault("tune", {})
    if isinstance(tune, dict) and tune.get("space") is None:
        tune["space"] = {}
    space = tune.get("space") if isinstance(tune, dict) else None
    if not isinstance(space, dict):
        raise ConfigError(f"cannot set {entry} in the space: tune.space is not a mapping", field=path)
    if value is not None:
        space[entry] = value
    elif space.pop(entry, None) is None:
        raise ConfigError(f"{entry} is not in the space (its paths: {', '.join(map(str, space))})", field=path)


def rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """The rung steps below max_t: grace, grace * factor, grace * factor^2, ..."""
    out, r = [], float(grace_period)
    while round(r) < max_t:
        if not out or round(r) > out[-1]:
            out.append(int(round(r)))
        r *= reduction_factor
    return out


def check_job(base: dict[str, Any], train: TrainConfig, tune: TuneSection, domains: list[Domain]) -> None:
    """The rules that join the two halves: fixed sections, search kind, the metric's source, ASHA rungs."""
    for d in domains:
        if d.path.split(".")[0] in FIXED_SECTIONS:
            raise ConfigError(f"the {d.path.split('.')[0]} section is shared by all trials and cannot be searched "
                              f"(searchable: optim, train, strategy and the method's section)",
                              field=f"tune.space.{d.path}")
        if tune.search == "grid" and d.kind not in ("grid", "same_as"):
            raise ConfigError(f"search: grid takes only grid (or same_as) domains; got {d.kind}",
                              field=f"tune.space.{d.path}")
        if tune.search == "tpe" and d.kind == "grid":
            raise ConfigError("search: tpe samples every value; use {choice: [...]} instead of grid",
                              field=f"tune.space.{d.path}")
    check_space(base, domains)
    t = train.train
    step_metric = method_of(train.method).step_metric
    if step_metric is not None:  # e.g. DDPO: no dataset, every epoch reports the epoch's mean reward
        metric, mode, why = step_metric
        if (tune.metric, tune.mode) != (metric, mode):
            raise ConfigError(f"{why}: set tune.metric: {metric} and tune.mode: {mode}", field="tune.metric")
    elif tune.metric not in TRIAL_METRICS:
        raise ConfigError(f"trials do not report {tune.metric!r} (they report {', '.join(TRIAL_METRICS)})",
                          field="tune.metric")
    elif tune.mode != TRIAL_METRICS[tune.metric]:  # max on a loss would rank, promote and export the worst trials
        raise ConfigError(f"tune.metric {tune.metric} is a loss (lower is better): mode {tune.mode} would keep the "
                          f"worst trials; set tune.mode: {TRIAL_METRICS[tune.metric]}", field="tune.mode")
    elif tune.metric == "val_loss":
        if train.data is None or train.data.validation_fraction <= 0:
            raise ConfigError("metric val_loss needs held-out rows: set data.validation_fraction (e.g. 0.2)",
                              field="data.validation_fraction")
        if t.validate_every is None:
            raise ConfigError("trials report at validation steps; set train.validate_every (e.g. 5)",
                              field="train.validate_every")
    check_repeats(tune, domains)
    s = tune.scheduler
    if s.name == "fifo":
        check_fifo(s)
    if s.name in ("asha", "sha"):
        max_t = s.max_t or t.max_steps
        if max_t > t.max_steps:
            raise ConfigError(f"{max_t} is beyond train.max_steps ({t.max_steps})", field="tune.scheduler.max_t")
        if s.grace_period >= max_t:
            raise ConfigError(f"{s.grace_period} must be below the last rung ({max_t} steps)",
                              field="tune.scheduler.grace_period")
        if s.name == "sha" and tune.search == "tpe":
            raise ConfigError("sha halves a fixed set of trials, while tpe proposes each trial from the results "
                              "so far; use scheduler asha with tpe", field="tune.scheduler.name")
        if s.name == "sha" and step_metric is None and t.validate_every is not None:
            late = [r for r in rungs(s.grace_period, s.reduction_factor, max_t) if r % t.validate_every]
            if late:
                raise ConfigError(f"rungs {late} are not multiples of train.validate_every ({t.validate_every}): "
                                  "trials report (and are judged) at validation steps; choose grace_period and "
                                  "reduction_factor so every rung is one", field="tune.scheduler.grace_period")
        if step_metric is None and t.validate_every is not None and s.grace_period < t.validate_every:
            raise ConfigError(f"{s.grace_period} is below train.validate_every ({t.validate_every}): no report "
                              "reaches the first rung in time", field="tune.scheduler.grace_period")


def check_repeats(tune: TuneSection, domains: list[Domain]) -> None:
    """num_samples > 1 over a space with nothing sampled repeats each grid point with the same config and the
    same run.seed (the run section is not searchable): trials that train, score and cost the same."""
    if tune.num_samples > 1 and all(d.kind in ("grid", "same_as") for d in domains):
        raise ConfigError(f"{tune.num_samples} repeats each grid point as identical trials (same config, same "
                          "run.seed; nothing in tune.space is sampled): set tune.num_samples: 1, or add a sampled "
                          "domain (search: random); for seed noise, run the search again with another run.seed and "
                          "tune.name", field="tune.num_samples")


def check_fifo(s: SchedulerSection) -> None:
    """fifo has no rungs: a rung setting given with it would be ignored without a word. A setting at its default
    passes (a saved job, `tune_job.yaml`, holds every field)."""
    for name in RUNG_SETTINGS:
        if getattr(s, name) != SchedulerSection.model_fields[name].default:
            raise ConfigError(f"scheduler fifo runs every trial to train.max_steps and has no rungs, so {name} "
                              "(an asha/sha setting) would be ignored: remove it", field=f"tune.scheduler.{name}")
