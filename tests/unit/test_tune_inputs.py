"""What a user hands `diffray tune` (no cluster): command-line overrides of single space entries, settings that would
waste or invert a search, and an experiment folder whose Tune state was torn. Each is read as meant or refused in
one line naming the field or the file, before Ray starts."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from diffray.errors import ConfigError
from diffray.tune.config import TRIAL_METRICS, load_tune_job
from diffray.tune.results import JOB_FILE, check_resume, read_experiment, save_job, tune_state

REPO = Path(__file__).resolve().parents[2]
TUNE_LORA = REPO / "configs" / "tune_lora.yaml"
GOOD_STATE = '{"trial_data": [], "runner_data": {}}'


# -- tune.space.<path>=... on the command line -----------------------------------------------------------------
def _space(overrides):
    job = load_tune_job(TUNE_LORA, overrides)
    return {d.path: (d.kind, d.args) for d in job.domains}, job


def test_one_space_entry_is_overridden_whole_by_its_dotted_path():
    """`tune.space.optim.lr=...` was nested as space -> optim -> lr and refused as `tune.space.optim: must be a
    mapping ... got {'lr': ...}`: a space's keys are dotted config paths, set whole."""
    space, job = _space(["tune.space.optim.lr={grid: [1e-4, 3e-4]}"])
    assert space == {"lora.rank": ("grid", (4, 8, 16, 32)), "optim.lr": ("grid", (1e-4, 3e-4)),
                     "lora.alpha": ("same_as", ("lora.rank",))}
    assert job.num_trials == 8 and list(job.tune.space) == ["lora.rank", "optim.lr", "lora.alpha"]
    space, job = _space(["tune.space.lora.dropout={grid: [0.0, 0.1]}"])  # a new entry, after the others
    assert space["lora.dropout"] == ("grid", (0.0, 0.1)) and job.num_trials == 16
    space, job = _space(["tune.space.optim.lr=null"])  # out of the space: every trial keeps optim.lr
    assert list(space) == ["lora.rank", "lora.alpha"] and job.num_trials == 4
    # in order with a whole-space override, as any other override
    space, _ = _space(["tune.space={lora.rank: {grid: [4, 8]}}", "tune.space.optim.lr={grid: [1e-3]}"])
    assert space == {"lora.rank": ("grid", (4, 8)), "optim.lr": ("grid", (1e-3,))}


@pytest.mark.parametrize("override, message", [
    ("tune.space.optim.lr=1e-4", "tune.space.optim.lr: must be a mapping with one of choice, grid, loguniform, "
     "uniform, randint, same_as, e.g. {choice: [4, 8]}; got 0.0001 (one value for every trial is the config's "
     "optim.lr: take the entry out of the space with tune.space.optim.lr=null and set optim.lr=0.0001)"),
    ("tune.space.lora.rank={grid: [4, 0]}", "tune.space.lora.rank: value 0: lora.rank: Input should be greater"),
    ("tune.space.lora.dropot=null", "tune.space.lora.dropot: lora.dropot is not in the space (its paths: lora.rank, "
     "optim.lr, lora.alpha)"),
])
def test_a_bad_space_entry_override_names_the_entry(override, message):
    with pytest.raises(ConfigError) as err:
        load_tune_job(TUNE_LORA, [override])
    assert str(err.value).startswith(message), str(err.value)


# -- settings that invert or waste the search ----------------------------------------------------------------
@pytest.mark.parametrize("metric", list(TRIAL_METRICS))
def test_mode_max_on_a_loss_is_refused(metric):
    """`mode: max` with a loss ranked, promoted (ASHA) and exported the worst trial."""
    with pytest.raises(ConfigError) as err:
        load_tune_job(TUNE_LORA, [f"tune.metric={metric}", "tune.mode=max"])
    assert str(err.value) == (f"tune.mode: tune.metric {metric} is a loss (lower is better): mode max would keep "
                              "the worst trials; set tune.mode: min")
    assert load_tune_job(TUNE_LORA, [f"tune.metric={metric}"]).tune.mode == "min"


def test_a_maximised_reward_still_tunes_with_mode_max(tmp_path):
    import yaml

    data = yaml.safe_load((REPO / "configs" / "ddpo.yaml").read_text())
    data["tune"] = {"space": {"optim.lr": {"grid": [1e-3, 1e-2]}}, "search": "grid", "metric": "reward_mean",
                    "mode": "max", "scheduler": {"grace_period": 1}}
    (tmp_path / "ddpo_tune.yaml").write_text(yaml.safe_dump(data))
    assert load_tune_job(tmp_path / "ddpo_tune.yaml").tune.mode == "max"


@pytest.mark.parametrize("overrides", [["tune.num_samples=3"], ["tune.search=random", "tune.num_samples=2"]])
def test_repeats_of_a_space_with_nothing_sampled_are_refused(overrides):
    """num_samples repeats the grid; with every value fixed by the grid and run.seed not searchable, the repeats
    were identical trials (3x the cost of the 8 that the grid needs)."""
    with pytest.raises(ConfigError) as err:
        load_tune_job(TUNE_LORA, overrides)
    n = overrides[-1].split("=")[1]
    assert str(err.value).startswith(f"tune.num_samples: {n} repeats each grid point as identical trials (same "
                                     "config, same run.seed; nothing in tune.space is sampled)"), str(err.value)


def test_repeats_with_a_sampled_domain_run():
    job = load_tune_job(TUNE_LORA, ["tune.search=random", "tune.num_samples=3",
                                    "tune.space.lora.dropout={uniform: [0.0, 0.1]}"])
    assert job.num_trials == 24


@pytest.mark.parametrize("overrides, field", [
    (["tune.scheduler={name: fifo, grace_period: 5}"], "grace_period"),
    (["tune.scheduler={name: fifo, reduction_factor: 4}"], "reduction_factor"),
    (["tune.scheduler.name=fifo", "tune.scheduler.max_t=20"], "max_t"),  # given after the switch
])
def test_fifo_refuses_rung_settings(overrides, field):
    """fifo ran every trial to train.max_steps, ignoring grace_period, reduction_factor and max_t without a word."""
    with pytest.raises(ConfigError) as err:
        load_tune_job(TUNE_LORA, overrides)
    assert str(err.value) == (f"tune.scheduler.{field}: scheduler fifo runs every trial to train.max_steps and has "
                              f"no rungs, so {field} (an asha/sha setting) would be ignored: remove it")


def test_switching_the_shipped_asha_job_to_fifo_drops_its_rung_settings(tmp_path):
    """`tune.scheduler.name=fifo` on a job written for asha means fifo: the rung settings set before the switch
    (the file's grace_period 5, an earlier override's reduction_factor) go with it; the saved job, which holds
    every scheduler field at its default, reads back."""
    job = load_tune_job(TUNE_LORA, ["tune.scheduler.reduction_factor=2", "tune.scheduler.name=fifo"])
    assert job.tune.scheduler.model_dump() == {"name": "fifo", "grace_period": 10, "reduction_factor": 3.0,
                                               "max_t": None}
    save_job(job, str(tmp_path))
    assert load_tune_job(tmp_path / JOB_FILE).tune.scheduler == job.tune.scheduler
    assert load_tune_job(TUNE_LORA, ["tune.scheduler.name=sha"]).tune.scheduler.grace_period == 5  # kept for sha


# -- a torn experiment state ---------------------------------------------------------------------------------
def _experiment(tmp_path, *states: tuple[str, bytes]) -> Path:
    exp = tmp_path / "tune-lora"
    save_job(load_tune_job(TUNE_LORA, [f"run.storage_path={tmp_path}"]), str(exp))
    for stamp, data in states:
        (exp / f"experiment_state-{stamp}.json").write_bytes(data)
    return exp


NEWER, OLDER = "2026-12-06_22-10-00", "2026-12-06_22-00-00"


@pytest.mark.parametrize("data, problem", [
    (b'{"trial_data": [["{\\"trial_id', "not JSON: Unterminated string starting at: line 1 column 18 (char 17)"),
    (b"", "the file is empty"),
    (b'{"trial_data": []}', "no trial_data and runner_data in it"),
    (b'{"trial_data": [], "runner_data": {"x": "\xff"}}', "not JSON: 'utf-8' codec can't decode byte 0xff"),
])
def test_results_of_a_torn_state_name_the_file(tmp_path, data, problem):
    """`diffray tune results DIR` printed `internal error: JSONDecodeError: ...` (KeyError: 'trial_data' for a
    file that is JSON but not Tune's)."""
    exp = _experiment(tmp_path, (NEWER, data))
    with pytest.raises(ConfigError) as err:
        read_experiment(str(exp))
    assert str(err.value).startswith(f"{exp}/experiment_state-{NEWER}.json: Tune's experiment state cannot be read "
                                     f"({problem}"), str(err.value)
    assert str(err.value).endswith(f"if its search is still running, try again in a moment; else restore the file "
                                   f"from a copy, or delete {exp} to start the search anew"), str(err.value)


def test_a_torn_newest_state_points_at_the_previous_readable_one(tmp_path):
    exp = _experiment(tmp_path, (OLDER, GOOD_STATE.encode()), (NEWER, b'{"trial_data": [['))
    with pytest.raises(ConfigError, match=f"delete it to go back to Tune's previous state experiment_state-{OLDER}"
                                          r"\.json, restore the file"):
        tune_state(str(exp))
    (exp / f"experiment_state-{NEWER}.json").unlink()  # as the message says: Tune then reads the older one
    assert tune_state(str(exp)) == f"{exp}/experiment_state-{OLDER}.json"


def test_resuming_on_a_torn_state_is_one_line_before_ray(tmp_path, tiny_model_path, monkeypatch, capsys):
    """A rerun restored the experiment on the torn file: Tune logged the JSONDecodeError and silently started the
    whole search anew. Now the rerun stops before Ray starts, naming the file."""
    from testkit.cli import diffray

    def no_ray():
        raise AssertionError("Ray was started before Tune's state was checked")

    monkeypatch.setattr("diffray.tune.runner.connect_ray", no_ray)
    base = [f"run.storage_path={tmp_path}", f"model.path={tiny_model_path}"]
    exp = tmp_path / "tune-lora"
    save_job(load_tune_job(TUNE_LORA, base), str(exp))
    (exp / "tuner.pkl").write_bytes(pickle.dumps({"_tuner_kwargs": {}}))  # Tune saves it as a search starts
    (exp / f"experiment_state-{NEWER}.json").write_text('{"trial_data": [["{\\"trial_id')
    code, text = diffray(["tune", TUNE_LORA, *base], monkeypatch, capsys)
    assert code == 2 and text.count("\n") == 1, text
    assert text.startswith(f"diffray: error: {exp}/experiment_state-{NEWER}.json: Tune's experiment state cannot "
                           "be read (not JSON: Unterminated string"), text
    (exp / f"experiment_state-{NEWER}.json").write_text(GOOD_STATE)  # a readable state: the resume check goes on
    check_resume(load_tune_job(TUNE_LORA, base), str(exp))


@pytest.mark.parametrize("override, entry", [("optim.lr=0.5", "optim.lr"), ("lora.alpha=4", "lora.alpha"),
                                             ("lora.rank=16", "lora.rank")])
def test_a_command_line_value_of_a_searched_setting_is_refused(override, entry):
    """`optim.lr=0.5` on `tune_lora.yaml`, whose space searches optim.lr: every trial would overwrite it with its own
    value, so the search would run as if it had not been given. Refused, naming both; unsearched settings pass."""
    with pytest.raises(ConfigError) as err:
        load_tune_job(TUNE_LORA, [override])
    assert str(err.value).startswith(f"{entry}: {entry} is searched (tune.space.{entry}), which sets it in every "
                                     "trial, so this value would be ignored"), err.value
    job = load_tune_job(TUNE_LORA, ["optim.warmup_steps=5", "lora.dropout=0.1", "tune.space.optim.lr=null",
                                    "optim.lr=0.5"])
    assert job.train.optim.lr == 0.5 and job.num_trials == 4


def test_a_search_not_started_yet_has_no_state_to_check(tmp_path):
    """A first run's experiment folder does not exist before Tune makes it: reading its state found nothing to
    resume, until the state check listed the missing folder (`internal error: FileNotFoundError` on every new
    search)."""
    job = load_tune_job(TUNE_LORA, [f"run.storage_path={tmp_path}"])
    assert tune_state(str(tmp_path / "tune-lora")) is None
    check_resume(job, str(tmp_path / "tune-lora"))  # a new search: nothing to compare, no error
    assert not (tmp_path / "tune-lora").exists()
