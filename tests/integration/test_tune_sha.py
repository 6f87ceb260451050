"""Synchronous successive halving (`tune.scheduler.name: sha`) on a real Ray Tune experiment whose trials
behave like diffray's: no Tune checkpoint, a restarted trial resumes from the last checkpoint its own run
wrote (at the rungs), and it reports `step` and the metric at validation steps.

The trials' loss is q + 10/step: the ranking is the same at every step, and the grid runs worst to best,
the order in which asynchronous ASHA stops almost nothing. The diffray-side runs (real Train trials) are in
test_tune.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ray import tune
from ray.tune import ExperimentAnalysis

from diffray.tune.config import rungs
from diffray.tune.results import stop_marker
from diffray.tune.schedulers import SHA_STATE_FILE, SuccessiveHalving

pytestmark = pytest.mark.slow

MAX_T, GRACE, FACTOR, EVERY = 60, 5, 4, 5


def run(tmp_path: Path, qs: list[float], fail_q: float | None = None, max_running: int = 2,
        slow_q: float | None = None):
    exp_dir = tmp_path / "exp"
    state_dir = tmp_path / "state"
    state_dir.mkdir()

    def trial(config, *, state_dir: str, fail_q: float | None, slow_q: float | None):  # nested: pickled by value
        """A trial that checkpoints at the rungs and resumes from its own last checkpoint when restarted."""
        tid = tune.get_context().get_trial_id()
        ckpt = Path(state_dir) / f"{tid}.ckpt"
        start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
        with open(Path(state_dir) / "starts.jsonl", "a") as f:
            f.write(json.dumps({"q": config["q"], "start": start}) + "\n")
        for step in range(start + 1, MAX_T + 1):
            if config["q"] == fail_q and step == 3:
                raise RuntimeError("this trial fails before the first rung")
            if step in rungs(GRACE, FACTOR, MAX_T):
                ckpt.write_text(json.dumps({"step": step}))
            if config["q"] == slow_q and step == GRACE:
                time.sleep(3)  # a straggler: the others wait at the rung meanwhile, with free slots
            if step % EVERY == 0:
                tune.report({"step": step, "loss": config["q"] + 10 / step})
    scheduler = SuccessiveHalving(str(exp_dir), num_trials=len(qs), grace_period=GRACE,
                                  reduction_factor=FACTOR, max_t=MAX_T, max_running=max_running)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, state_dir=str(state_dir), fail_q=fail_q, slow_q=slow_q),
                            {"CPU": 0, "memory": 2**20}),
        param_space={"q": tune.grid_search(qs)},
        tune_config=tune.TuneConfig(metric="loss", mode="min", scheduler=scheduler),
        run_config=tune.RunConfig(name="exp", storage_path=str(tmp_path), verbose=0))
    grid = tuner.fit()
    # Tune's own saved state (what a restore and ExperimentAnalysis read): no trial left paused
    assert {t.status for t in ExperimentAnalysis(str(exp_dir)).trials} <= {"TERMINATED", "ERROR"}
    by_q = {r.config["q"]: r for r in grid}
    starts = [json.loads(line) for line in (state_dir / "starts.jsonl").read_text().splitlines()]
    return exp_dir, by_q, starts


@pytest.fixture(autouse=True)
def save_state_often(monkeypatch):
    """Tune saves its experiment state at every step, so a paused trial is on disk as paused before the
    rung stops it: the stop must reach the saved state too."""
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")


@pytest.mark.eval  # CI: unit/test_tune_results.py (rung records, restore)
def test_each_rung_keeps_the_best_quarter_of_the_whole_rung_and_survivors_resume_at_their_rung(ray_cluster, tmp_path):
    qs = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]  # worst first
    exp_dir, by_q, starts = run(tmp_path, qs)

    steps = {q: r.metrics["step"] for q, r in by_q.items()}
    assert steps == {8.0: 5, 7.0: 5, 6.0: 5, 5.0: 5, 4.0: 5, 3.0: 5, 2.0: 20, 1.0: 60}
    assert sum(steps.values()) == 8 * 5 + 2 * 15 + 1 * 40 == 110  # 0.23 of the grid's 480
    assert all(r.error is None for r in by_q.values())
    # every trial started once from scratch; a trial paused at a rung came back from that rung's checkpoint
    # (the trial whose report completes a rung and that goes on is not paused: it just continues)
    assert sorted(s["q"] for s in starts if s["start"] == 0) == sorted(qs)
    restarts = {(s["q"], s["start"]) for s in starts if s["start"] != 0}
    assert restarts <= {(2.0, 5), (1.0, 5), (1.0, 20)} and restarts & {(2.0, 5), (1.0, 5)}
    assert len(starts) == len(qs) + len(restarts)
    stopped = {q for q, r in by_q.items() if Path(stop_marker(str(exp_dir), r.metrics["trial_id"])).exists()}
    assert stopped == set(qs) - {1.0}
    state = json.loads((exp_dir / SHA_STATE_FILE).read_text())
    assert state["rungs"] == [5, 20] and state["expected"] == [8, 2]


@pytest.mark.eval  # CI: unit/test_tune_results.py
def test_a_trial_that_fails_before_its_rung_does_not_hold_the_rung_up(ray_cluster, tmp_path):
    qs = [5.0, 4.0, 3.0, 2.0, 1.0]
    exp_dir, by_q, starts = run(tmp_path, qs, fail_q=1.0, max_running=3, slow_q=5.0)

    assert by_q[1.0].error is not None and "fails before the first rung" in str(by_q[1.0].error)
    steps = {q: r.metrics.get("step") for q, r in by_q.items() if q != 1.0}
    # the rung holds the 4 trials left: one (4 // 4) goes on, the best of them
    assert steps == {5.0: 5, 4.0: 5, 3.0: 5, 2.0: 60}
    state = json.loads((exp_dir / SHA_STATE_FILE).read_text())
    assert state["expected"] == [4, 1] and len(state["gone"]) == 1
    # trials waiting at the rung while others still ran were not started again (only the winner resumes)
    assert {(s["q"], s["start"]) for s in starts if s["start"]} <= {(2.0, 5)}
