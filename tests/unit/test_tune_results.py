"""A trial's status in the results table: "stopped early" only when the scheduler stopped it at a rung
(recorded by the runner's ASHA as it decides), never because a trial merely ended short of its steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffray.tune.results import _status, stop_marker


@pytest.mark.parametrize("tune_status,steps,errored,stopped,expected", [
    ("TERMINATED", 12, False, False, "completed"),
    ("TERMINATED", 6, False, True, "stopped early"),   # ASHA stopped it at the rung of step 6
    ("TERMINATED", 6, False, False, "error"),          # ended short without a scheduler stop: not "stopped early"
    ("ERROR", 9, True, False, "error"),                # crashed mid-trial
    ("TERMINATED", 6, True, False, "error"),           # an error recorded wins over the Tune status
    ("RUNNING", 3, False, False, "running"),
    ("PAUSED", 3, False, False, "pending"),
])
def test_status_stopped_early_means_stopped_by_the_scheduler(tune_status, steps, errored, stopped, expected):
    assert _status(tune_status, steps, 12, errored, stopped) == expected


def test_asha_records_rung_stops_but_not_the_end_at_max_t(tmp_path):
    from ray.tune.experiment import Trial

    from diffray.tune.schedulers import RungStopScheduler

    exp = str(tmp_path / "exp")
    sched = RungStopScheduler(exp, time_attr="step", max_t=12, grace_period=3, reduction_factor=2)
    sched.set_search_properties("val_loss", "min")
    good, poor = (Trial("__fake", stub=True, trial_id=t) for t in ("good", "poor"))
    for t in (good, poor):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, good, {"step": 3, "val_loss": 0.1}) == sched.CONTINUE
    assert sched.on_trial_result(None, poor, {"step": 3, "val_loss": 0.5}) == sched.STOP  # below the rung's cutoff
    assert sched.on_trial_result(None, good, {"step": 12, "val_loss": 0.05}) == sched.STOP  # ASHA ends it at max_t
    assert json.loads(Path(stop_marker(exp, "poor")).read_text()) == {"step": 3}
    assert not Path(stop_marker(exp, "good")).exists()


def test_sha_decisions_survive_a_restored_experiment(tmp_path):
    """Tune does not save a scheduler's state: sha keeps its rung records beside the experiment, so after a
    restore a trial that had reported at its rung waits there instead of running past it."""
    from ray.tune.experiment import Trial

    from diffray.tune.schedulers import SuccessiveHalving

    exp = str(tmp_path / "exp")

    def scheduler():
        s = SuccessiveHalving(exp, num_trials=3, grace_period=3, reduction_factor=3, max_t=12, max_running=2)
        s.set_search_properties("val_loss", "max")
        return s

    a, b, c = (Trial("__fake", stub=True, trial_id=t) for t in "abc")
    first = scheduler()
    for t in (a, b, c):
        first.on_trial_add(None, t)
    assert first.on_trial_result(None, a, {"step": 2, "val_loss": 0.1}) == first.CONTINUE  # before the rung
    assert first.on_trial_result(None, a, {"step": 3, "val_loss": 0.1}) == first.PAUSE
    assert first.on_trial_result(None, b, {"step": 3, "val_loss": 0.2}) == first.PAUSE
    assert first.records[0] == {"a": -0.1, "b": -0.2}  # mode max: stored negated, lower is better

    again = scheduler()
    for t in (a, b, c):
        again.on_trial_add(None, t)
    assert again.waiting("a") and again.waiting("b") and not again.waiting("c")
    assert again.on_trial_result(None, a, {"step": 6, "val_loss": 0.3}) == again.PAUSE  # judged at rung 3 only
    assert again.records[0]["a"] == -0.1 and again.expected == [3, None]


def test_results_of_an_experiment_stopped_before_tune_saved_state_is_a_typed_error(tmp_path):
    """`diffray tune results DIR` on a job killed before Tune wrote experiment_state-*.json: one line."""
    from diffray.errors import ConfigError
    from diffray.tune.results import JOB_FILE, read_experiment

    exp = tmp_path / "tune-lora"
    exp.mkdir()
    (exp / JOB_FILE).write_text((Path(__file__).parents[2] / "configs" / "tune_lora.yaml").read_text())
    with pytest.raises(ConfigError, match=f"{exp}: no trial results yet \\(the experiment never started or was "
                                          "stopped before Tune saved its state\\)"):
        read_experiment(str(exp))
