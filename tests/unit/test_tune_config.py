"""A Tune job's YAML (no cluster): the `tune:` section and the rules that join it to the training config,
each refusal naming its field; the results table built from trial rows."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import yaml

from diffray.errors import ConfigError
from diffray.tune.config import load_tune_job
from diffray.tune.results import TrialRow, format_table, to_table

REPO = Path(__file__).resolve().parents[2]
TUNE_LORA = REPO / "configs" / "tune_lora.yaml"


def test_shipped_job_and_overrides():
    job = load_tune_job(TUNE_LORA, ["tune.scheduler.grace_period=10", "train.max_steps=40", "tune.name=other"])
    assert job.name == "other" and job.max_steps == 40 and job.tune.scheduler.grace_period == 10
    assert [d.path for d in job.domains] == ["lora.rank", "optim.lr", "lora.alpha"]
    assert job.tune.metric == "val_loss" and job.tune.search == "grid" and "tune" not in job.base


def _job_with(tmp_path, edit) -> Path:
    data = yaml.safe_load(TUNE_LORA.read_text())
    edit(data)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit, field, message", [
    (lambda d: d.pop("tune"), "tune", "a Tune job needs a `tune:` section"),
    (lambda d: d["tune"].update(serch="grid"), "tune.serch", "unknown key"),
    (lambda d: d["tune"].update(search="bayes"), "tune.search", "'grid', 'random' or 'tpe'"),
    (lambda d: d["tune"]["space"].update({"data.resolution": {"grid": [32, 64]}}), "tune.space.data.resolution",
     "the data section is shared by all trials"),
    (lambda d: d["tune"]["space"].update({"scaling.num_workers": {"grid": [1, 2]}}), "tune.space.scaling.num_workers",
     "cannot be searched"),
    (lambda d: d["tune"]["space"].update({"lora.dropout": {"uniform": [0, 0.1]}}), "tune.space.lora.dropout",
     "search: grid takes only grid"),
    (lambda d: d["tune"].update(search="tpe"), "tune.space.lora.rank", "use {choice: [...]} instead of grid"),
    (lambda d: d["data"].update(validation_fraction=0.0), "data.validation_fraction", "needs held-out rows"),
    (lambda d: d["train"].update(validate_every=None), "train.validate_every", "trials report at validation"),
    (lambda d: d["tune"]["scheduler"].update(grace_period=3), "tune.scheduler.grace_period",
     "below train.validate_every (5)"),
    (lambda d: d["tune"]["scheduler"].update(grace_period=30), "tune.scheduler.grace_period",
     "must be below the last rung (30 steps)"),
    (lambda d: d["tune"]["scheduler"].update(max_t=50), "tune.scheduler.max_t", "beyond train.max_steps (30)"),
    (lambda d: d["tune"]["space"].update({"lora.rnk": {"grid": [4]}}), "tune.space.lora.rnk", "unknown key"),
    (lambda d: d["tune"].update(search="tpe", space={"lora.rank": {"choice": [4, 8]}}, scheduler={"name": "sha"}),
     "tune.scheduler.name", "use scheduler asha with tpe"),
    (lambda d: d["tune"].update(scheduler={"name": "sha", "grace_period": 5, "reduction_factor": 2.5}),
     "tune.scheduler.grace_period", "rungs [12] are not multiples of train.validate_every (5)"),
    (lambda d: d["lora"].update(rank=0), "lora.rank", "greater than"),
    (lambda d: d["tune"].update(metric="val_los"), "tune.metric",
     "trials do not report 'val_los' (they report val_loss, loss, loss_first_mean, loss_last_mean)"),
])
def test_bad_jobs_name_the_field(tmp_path, edit, field, message):
    with pytest.raises(ConfigError) as err:
        load_tune_job(_job_with(tmp_path, edit))
    assert field in str(err.value) and message in str(err.value), str(err.value)


def test_sha_trials_rungs_and_checkpoints():
    from diffray.trainers.session import schedule
    from diffray.tune.config import rungs
    from diffray.tune.runner import sha_rungs

    assert rungs(5, 4, 60) == [5, 20] and rungs(5, 3, 60) == [5, 15, 45] and rungs(1, 1.5, 10) == [1, 2, 3, 5, 8]
    job = load_tune_job(TUNE_LORA, ["tune.scheduler.name=sha", "tune.num_samples=2", "tune.search=random",
                                    "tune.space.lora.dropout={uniform: [0.0, 0.1]}"])
    assert job.num_trials == 16 and sha_rungs(job) == [5, 15]
    assert sha_rungs(load_tune_job(TUNE_LORA)) == []  # asha: no extra checkpoints
    train = job.train.train.model_copy(update={"checkpoint_steps": [5, 15]})  # checkpoint_every 30
    assert [s for s in range(1, 31) if schedule(train, s)[2]] == [5, 15, 30]


def test_tpe_job_with_choice_domains_validates(tmp_path):
    def edit(d):
        d["tune"].update(search="tpe", num_samples=6)
        d["tune"]["space"] = {"lora.rank": {"choice": [4, 8, 16, 32]}, "optim.lr": {"loguniform": [1e-4, 1e-2]},
                              "lora.alpha": {"same_as": "lora.rank"}}
    job = load_tune_job(_job_with(tmp_path, edit))
    assert job.tune.search == "tpe" and job.tune.num_samples == 6


def test_results_table_orders_columns_and_formats():
    rows = [TrialRow("a", {"lora.rank": 8, "optim.lr": 1e-3}, "completed", 30, 0.51234567, 0.5),
            TrialRow("b", {"lora.rank": 4, "optim.lr": 3e-4}, "stopped early", 5, 0.9, 0.9),
            TrialRow("c", {"lora.rank": 16, "optim.lr": 3e-3}, "error", 0, math.nan, math.nan, error="boom")]
    table = to_table(rows, "val_loss")
    assert table.column_names == ["trial_id", "lora.rank", "optim.lr", "val_loss", "best_val_loss", "steps",
                                  "status", "stopped_early", "error"]
    assert table.column("stopped_early").to_pylist() == [False, True, False]
    text = format_table(rows, "val_loss").splitlines()
    assert text[1].split()[:4] == ["a", "8", "0.001", "0.512346"] and text[3].split()[3] == "nan"


def test_plots_of_a_search_no_trial_has_reported_in_yet_are_drawn_without_a_warning(tmp_path):
    """`diffray tune results` on a search just started printed matplotlib's "No artists with labels found to put
    in legend" on the terminal."""
    import warnings

    from diffray.tune.config import load_tune_job
    from diffray.tune.results import plot_results

    rows = [TrialRow("a", {"lora.rank": 8}, "pending", 0, math.nan, math.nan),
            TrialRow("b", {"lora.rank": 4}, "running", 0, math.nan, math.nan)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots = plot_results(rows, load_tune_job(TUNE_LORA), tmp_path)
    assert all(Path(p).stat().st_size > 0 for p in plots.values())


def test_cli_errors_are_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    diffray = str(Path(sys.executable).parent / "diffray")
    for args, line in [
        (["tune", str(TUNE_LORA), "tune.scheduler.grace_period=2"],
         "diffray: error: tune.scheduler.grace_period: 2 is below train.validate_every (5): no report reaches the "
         "first rung in time"),
        (["tune", "results", str(tmp_path)],
         f"diffray: error: DIR: {tmp_path} is not a diffray tune experiment (no tune_job.yaml)"),
    ]:
        proc = subprocess.run([diffray, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.strip() == line, proc.stderr


def _ddpo_job(tmp_path, **tune) -> Path:
    data = yaml.safe_load((REPO / "configs" / "ddpo.yaml").read_text())
    data["tune"] = {"space": {"optim.lr": {"grid": [1e-3, 1e-2]}}, "search": "grid", **tune}
    path = tmp_path / "ddpo_tune.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_ddpo_jobs_tune_on_the_reward(tmp_path):
    job = load_tune_job(_ddpo_job(tmp_path, metric="reward_mean", mode="max", scheduler={"grace_period": 1}))
    assert job.train.method == "ddpo" and job.train.data is None
    with pytest.raises(ConfigError, match=r"tune\.metric: DDPO trials report the epoch's mean reward"):
        load_tune_job(_ddpo_job(tmp_path))  # the default val_loss needs a dataset DDPO does not have
    with pytest.raises(ConfigError, match=r"tune\.space\.data\.path: the data section is shared"):
        load_tune_job(_ddpo_job(tmp_path, metric="reward_mean", mode="max",
                                space={"data.path": {"grid": ["a", "b"]}}))


def test_on_an_autoscaling_cluster_every_trial_is_asked_for_at_once():
    from diffray.tune.runner import trial_concurrency

    job = load_tune_job(REPO / "configs" / "tune_lora.yaml")  # a grid of 8 trials
    assert job.num_trials == 8 and trial_concurrency(job, autoscaled=True) == 8  # the alive nodes are no limit
    capped = load_tune_job(REPO / "configs" / "tune_lora.yaml", ["tune.max_concurrent_trials=3"])
    assert trial_concurrency(capped, autoscaled=True) == 3


def test_the_metrics_a_job_may_name_are_the_ones_a_trial_reports():
    from diffray.trainers.session import summary_metrics
    from diffray.tune.config import TRIAL_METRICS

    state = {"step": 5, "first_losses": [0.3], "recent_losses": [0.2], "val_loss": 0.25, "val_loss_step": 5}
    assert set(TRIAL_METRICS) <= set(summary_metrics(state))


def test_a_rerun_that_changes_a_restored_experiment_is_refused_before_ray(tmp_path, tiny_model_path, monkeypatch,
                                                                         capsys):
    """Rerunning an experiment name restores what Tune saved (its space, scheduler and trials) and resumes its
    trials with the rerun's training config: with another learning rate or rung the results would mix two
    experiments under one table. Such a rerun is refused, naming what changed, before Ray starts; what leaves the
    trained weights alone may change, and an experiment Tune never saved state for starts anew."""
    from testkit.cli import diffray

    from diffray.errors import ConfigError
    from diffray.tune.results import check_resume, save_job

    base = [f"run.storage_path={tmp_path}", f"model.path={tiny_model_path}"]
    exp = tmp_path / "tune-lora"
    save_job(load_tune_job(TUNE_LORA, base), str(exp))
    check_resume(load_tune_job(TUNE_LORA, [*base, "optim.warmup_steps=5"]), str(exp))  # no Tune state: starts anew
    (exp / "experiment_state-2026-12-06_22-00-00.json").write_text('{"trial_data": [], "runner_data": {}}')
    (exp / "tuner.pkl").write_bytes(pickle.dumps({"_tuner_kwargs": {}}))  # Tune saves it as a search starts

    def no_ray():
        raise AssertionError("Ray was started before the rerun's settings were checked")

    monkeypatch.setattr("diffray.tune.runner.connect_ray", no_ray)

    for change, named in [("optim.warmup_steps=5", "optim.warmup_steps 2 (now 5)"),
                          ("tune.scheduler.grace_period=10", "tune.scheduler.grace_period 5 (now 10)"),
                          ("train.max_steps=60", "train.max_steps 30 (now 60)")]:
        code, text = diffray(["tune", TUNE_LORA, *base, change], monkeypatch, capsys)
        assert code == 2 and text.count("\n") == 1, text
        assert text.startswith(f"diffray: error: tune.name: experiment {exp} was started with other settings: "
                               f"{named}. A rerun resumes"), text

    for free in (["train.log_every=1", "failure.max_failures=2"],  # how it is watched
                 ["scaling.num_workers=2", "train.micro_batch_size=2"]):  # the same global batch of 4
        check_resume(load_tune_job(TUNE_LORA, [*base, *free]), str(exp))
    with pytest.raises(ConfigError, match="train.micro_batch_size 4 \\(now 2\\)"):
        check_resume(load_tune_job(TUNE_LORA, [*base, "train.micro_batch_size=2"]), str(exp))


def test_a_tune_storage_path_that_cannot_hold_the_experiment_is_one_line_before_ray(tmp_path, monkeypatch, capsys):
    """As for `diffray train`: a run.storage_path that is a file was an internal error (NotADirectoryError) once
    Ray had started."""
    from testkit.cli import diffray

    def no_ray():
        raise AssertionError("Ray was started before the storage path was checked")

    monkeypatch.setattr("diffray.tune.runner.connect_ray", no_ray)
    (tmp_path / "afile").write_text("not a folder")
    code, text = diffray(["tune", TUNE_LORA, f"run.storage_path={tmp_path / 'afile'}"], monkeypatch, capsys)
    assert code == 2 and text == (f"diffray: error: run.storage_path: {tmp_path / 'afile'} is a file, not a folder "
                                  f"(the run's folder would be {tmp_path / 'afile'}/tune-lora)\n"), text
    assert (tmp_path / "afile").read_text() == "not a folder"
