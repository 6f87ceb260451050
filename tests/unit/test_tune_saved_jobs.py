"""An experiment folder that `diffray tune` saved and a later run reads back (no cluster): a `tuner.pkl` torn by a
crash while Tune wrote it, and a saved job (`tune_job.yaml`) that an older diffray accepted but today's rules on
setting up a search refuse. Results are read as the search ran; a resume stops in one line naming the file or the
setting and what to do, before Ray starts."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

from diffray.errors import ConfigError
from diffray.tune.config import load_tune_job
from diffray.tune.results import JOB_FILE, TUNER_FILE, _pickle_problem, check_resume, save_job

REPO = Path(__file__).resolve().parents[2]
TUNE_LORA = REPO / "configs" / "tune_lora.yaml"
STATE = "experiment_state-2026-12-06_22-00-00.json"
GOOD_STATE = '{"trial_data": [], "runner_data": {}}'
# What Tune's tuner.pkl holds, in shape: a dict of settings pickled by the stdlib (`TunerInternal.__init__`).
TUNER_STATE = {"__trainable_name": "run_trial", "__flattened_param_space_keys": ["lora.rank", "optim.lr"],
               "_run_config": {"name": "tune-lora", "storage_path": "/runs"}, "_tuner_kwargs": {"verbose": 0}}


def _no_ray():
    raise AssertionError("Ray was started before the experiment folder was checked")


# -- a torn tuner.pkl ------------------------------------------------------------------------------------------
CALLS: list[str] = []


def _record_call() -> None:
    CALLS.append("unpickled")


class _Runs:
    """Unpickling it calls `_record_call`: the check must read a pickle's opcodes, never run them."""

    def __reduce__(self):
        return (_record_call, ())


def test_the_tuner_check_reads_a_pickles_opcodes_and_finds_every_cut():
    data = pickle.dumps({**TUNER_STATE, "object": _Runs()}, protocol=5)
    assert _pickle_problem(data) is None and CALLS == []
    pickle.loads(data)  # what Tune does with it
    assert CALLS == ["unpickled"]
    assert _pickle_problem(b"") == "the file is empty"
    cut = [n for n in range(1, len(data)) if _pickle_problem(data[:n]) is None]
    assert cut == [], f"prefixes read as whole pickles: {cut}"
    assert _pickle_problem(data[:len(data) // 2]).startswith("not a whole pickle: "), _pickle_problem(data[:40])


@pytest.mark.parametrize("data", [b"", pickle.dumps(TUNER_STATE, protocol=5)[:100]], ids=["empty", "truncated"])
@pytest.mark.parametrize("trials_saved", [True, False])
def test_resuming_on_a_torn_tuner_pkl_is_one_line_before_ray(tmp_path, tiny_model_path, monkeypatch, capsys, data,
                                                            trials_saved):
    """Tune unpickles tuner.pkl as it restores, before it reads its state: a rerun on a torn one ended in
    `internal error: UnpicklingError: pickle data was truncated` (EOFError for an empty file), after the datasets
    were built. With trials saved, their results are still read (Tune's state and the job, not tuner.pkl); a crash
    as a search started (tuner.pkl is written first) left nothing to read and the folder to delete."""
    from testkit.cli import diffray

    from diffray.tune.results import read_experiment

    monkeypatch.setattr("diffray.tune.runner.connect_ray", _no_ray)
    base = [f"run.storage_path={tmp_path}", f"model.path={tiny_model_path}"]
    exp = tmp_path / "tune-lora"
    exp.mkdir()
    if trials_saved:
        save_job(load_tune_job(TUNE_LORA, base), str(exp))
        (exp / STATE).write_text(GOOD_STATE)
    (exp / TUNER_FILE).write_bytes(data)
    code, text = diffray(["tune", TUNE_LORA, *base], monkeypatch, capsys)
    problem = "the file is empty" if not data else "not a whole pickle: "
    assert code == 2 and text.count("\n") == 1, text
    assert text.startswith(f"diffray: error: {exp}/{TUNER_FILE}: Tune's saved search is damaged ({problem}"), text
    if trials_saved:
        assert text.endswith(f"so it cannot be resumed: its trials' results stay readable with `diffray tune results "
                             f"{exp}`; to search again, move {exp} aside (its results can be read there too) or give "
                             "a new tune.name\n"), text
        assert read_experiment(str(exp))[1] == []
    else:
        assert text.endswith(f"so it cannot be resumed: no trial results were saved: delete {exp}, or give a new "
                             "tune.name, to start the search anew\n"), text
    (exp / TUNER_FILE).write_bytes(pickle.dumps(TUNER_STATE, protocol=5))  # whole again: the resume goes on
    check_resume(load_tune_job(TUNE_LORA, base), str(exp))


# -- a saved job that today's rules refuse -------------------------------------------------------------------------
# Each refused by a rule added after searches were run with it: the setting as saved, the fix a user reruns with,
# and the start of the rule's message (the field it names).
REFUSED = {
    "repeats": ({"num_samples": 2}, ["tune.num_samples=1"], "tune.num_samples: 2 repeats each grid point"),
    "max_on_a_loss": ({"mode": "max"}, ["tune.mode=min"], "tune.mode: tune.metric val_loss is a loss"),
    "fifo_rungs": ({"scheduler": {"name": "fifo", "grace_period": 5, "reduction_factor": 3.0, "max_t": None}},
                   ["tune.scheduler.name=fifo"], "tune.scheduler.grace_period: scheduler fifo runs every trial"),
}


def _old_experiment(tmp_path, tune: dict) -> Path:
    """An experiment folder as an older diffray left it: its job saved with `tune` (every field, as `save_job`
    writes it), and Tune's state."""
    job = load_tune_job(TUNE_LORA, [f"run.storage_path={tmp_path}"])
    exp = tmp_path / "tune-lora"
    exp.mkdir()
    data = {**job.base, "tune": {**job.tune.model_dump(mode="json"), **tune}}
    (exp / JOB_FILE).write_text(yaml.safe_dump(data, sort_keys=False))
    (exp / STATE).write_text(GOOD_STATE)
    (exp / TUNER_FILE).write_bytes(pickle.dumps(TUNER_STATE, protocol=5))
    return exp


@pytest.mark.parametrize("case", REFUSED)
def test_results_of_a_saved_job_refused_today_are_read_as_it_ran(tmp_path, monkeypatch, capsys, case):
    """`diffray tune results DIR` validated the saved job as a new search, so a search an older diffray ran could
    not be read back at all (`diffray: error: tune.num_samples: 2 repeats ...`). Reading needs no rule on how a
    search may be set up: the table is printed, with a warning naming the rule."""
    from testkit.cli import diffray

    tune, _, rule = REFUSED[case]
    exp = _old_experiment(tmp_path, tune)
    code, text = diffray(["tune", "results", exp], monkeypatch, capsys)
    assert code == 0, text
    assert f"diffray: warning: {exp}/{JOB_FILE}: this search was set up in a way diffray refuses now ({rule}" in text
    assert "trial_id" in text and f"csv: {exp}/results.csv" in text, text


@pytest.mark.parametrize("case", REFUSED)
def test_resuming_a_saved_job_refused_today_names_the_rule(tmp_path, case):
    """The rerun with the setting fixed was told `tune_job.yaml is not the job this experiment was started with`,
    as if the file had been changed. It names the rule that refuses the saved search now, and what to do."""
    tune, fix, rule = REFUSED[case]
    exp = _old_experiment(tmp_path, tune)
    with pytest.raises(ConfigError) as err:
        check_resume(load_tune_job(TUNE_LORA, [f"run.storage_path={tmp_path}", *fix]), str(exp))
    assert str(err.value).startswith(f"experiment {exp} was started with a setting diffray refuses now, so it "
                                     f"cannot be resumed ({rule}"), str(err.value)
    assert str(err.value).endswith(f"Its trials' results stay readable with `diffray tune results {exp}`; to search "
                                   "again, fix the setting and give a new tune.name"), str(err.value)
    saved = yaml.safe_load((exp / JOB_FILE).read_text())
    (exp / JOB_FILE).write_text(yaml.safe_dump({**saved, "tune": {**saved["tune"], "mode": "sideways"}}))
    with pytest.raises(ConfigError, match=f"{exp}/{JOB_FILE} is not the job this experiment was started with"):
        check_resume(load_tune_job(TUNE_LORA, [f"run.storage_path={tmp_path}", *fix]), str(exp))


def test_resuming_a_search_whose_tuner_pkl_was_deleted_is_one_line(tmp_path):
    """Without tuner.pkl, `Tuner.can_restore` says no, and Tune started a new search in the folder of the old one,
    beside its trials (their results then mixed in one table)."""
    base = [f"run.storage_path={tmp_path}"]
    exp = tmp_path / "tune-lora"
    exp.mkdir()
    save_job(load_tune_job(TUNE_LORA, base), str(exp))
    (exp / STATE).write_text(GOOD_STATE)
    with pytest.raises(ConfigError) as err:
        check_resume(load_tune_job(TUNE_LORA, base), str(exp))
    assert str(err.value) == (f"{exp}/{TUNER_FILE} is missing beside the search's saved trials, so it cannot be "
                              f"resumed: its trials' results stay readable with `diffray tune results {exp}`; to "
                              f"search again, move {exp} aside or give a new tune.name")


def test_a_saved_job_whose_training_config_is_refused_today_is_read_and_its_resume_names_the_field(
        tmp_path, monkeypatch, capsys):
    """A saved job with a training setting today's diffray does not know (an older one had it) could be neither read
    (`diffray tune results` stopped on the unknown key) nor resumed ("tune_job.yaml is not the job this experiment
    was started with", as if the file had been changed). Its results need only the search's own settings: the table
    is printed with a warning naming the field; the resume names it and what to do."""
    from testkit.cli import diffray

    exp = _old_experiment(tmp_path, {})
    saved = yaml.safe_load((exp / JOB_FILE).read_text())
    saved["train"]["warmup_ratio"] = 0.1  # no such setting
    (exp / JOB_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    code, text = diffray(["tune", "results", exp], monkeypatch, capsys)
    assert code == 0, text
    assert (f"diffray: warning: {exp}/{JOB_FILE}: this search was set up in a way diffray refuses now (its training "
            "config: train.warmup_ratio") in text, text
    assert "trial_id" in text and f"csv: {exp}/results.csv" in text, text
    with pytest.raises(ConfigError) as err:
        check_resume(load_tune_job(TUNE_LORA, [f"run.storage_path={tmp_path}"]), str(exp))
    assert str(err.value).startswith(f"experiment {exp} was started with a setting diffray refuses now, so it cannot "
                                     "be resumed (its training config: train.warmup_ratio"), str(err.value)
    from diffray.tune.config import load_saved_job

    job = load_saved_job(exp / JOB_FILE)
    assert job.train is None and job.name == "tune-lora" and job.max_steps == saved["train"]["max_steps"] > 0
