"""The trial schedulers of `diffray tune`: asynchronous ASHA (Ray's, recording its stops) and synchronous
successive halving (`sha`, ours).

Which to pick. ASHA decides at a rung from the trials that reached it so far, so it never waits and keeps
every worker busy, but the first trials to arrive always go on: on a small search (here 8 trials) it spends
0.4-0.5x the grid's trial-steps. `sha` waits until every trial of a rung has reported, keeps the best
1/reduction_factor and stops the rest, so a search of n trials spends about n * grace + the survivors'
steps (0.23x at 8 trials, 60 steps, grace 5, factor 4). Trials that reach a rung early are paused (their
worker groups freed for the next trial) and resume from the checkpoint their Train run wrote at the rung.
Every pause costs a restart of the trial's Train run (about 26 s on a 2-core machine), so `sha` pays off
when trials are long (real models, hundreds of steps); pick `asha` for short trials and for large searches
(dozens of trials or more), where waiting on a rung's slowest trial would idle workers.
"""

from __future__ import annotations

import json
import math

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from diffray import storage
from diffray.tune.config import rungs
from diffray.tune.results import stop_marker

SHA_STATE_FILE = "sha_state.json"


class RungStopScheduler(ASHAScheduler):
    """ASHA that records each trial it stops at a rung below max_t (`results.stop_marker`), so the
    results table tells "stopped by the scheduler" from "ended short" without guessing from step counts.
    A stop at max_t is ASHA ending a trial that ran the whole way: not recorded."""

    def __init__(self, exp_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.exp_dir = exp_dir

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        step = result.get(self._time_attr)
        if action == self.STOP and step is not None and step < self._max_t:
            storage.write_text(stop_marker(self.exp_dir, trial.trial_id), json.dumps({"step": step}))
        return action


class SuccessiveHalving(FIFOScheduler):
    """Synchronous successive halving over a known number of trials.

    Every trial runs to the first rung and is paused there; when the whole rung has reported (or failed),
    the best max(1, n // reduction_factor) go on to the next rung and the rest are stopped (recorded with
    `results.stop_marker`). Survivors of the last rung run to the end. A paused trial restarts its Tune
    function, whose Train run of the same name resumes from its last checkpoint, so the trial config must
    checkpoint at every rung (`runner.run_trial` adds them to `train.checkpoint_steps`).

    The scheduler itself caps the trials running at once (`max_running`): Tune's `max_concurrent_trials`
    counts paused trials as live, so a rung that pauses that many trials would never get the rest started.
    The rung records live in `<exp_dir>/sha_state.json`, so a restored experiment keeps its decisions
    (Tune does not save a scheduler's state).
    """

    _supports_buffered_results = False  # one result at a time: a rung's report must be judged before the next

    def __init__(self, exp_dir: str, *, num_trials: int, grace_period: int,
                 reduction_factor: float, max_t: int, max_running: int, time_attr: str = "step"):
        super().__init__()
        self.max_running = max_running
        self.exp_dir, self._mode = exp_dir, "min"  # metric and mode come from the TuneConfig
        self.time_attr, self.factor, self.max_t = time_attr, reduction_factor, max_t
        self.rungs = rungs(grace_period, reduction_factor, max_t)
        self.expected = [num_trials] + [None] * (len(self.rungs) - 1)  # trials each rung waits for
        self.records: list[dict[str, float]] = [{} for _ in self.rungs]  # rung -> trial -> signed metric
        self.level: dict[str, int] = {}   # trial -> the rung it runs towards (len(rungs): to the end)
        self.stopped: set[str] = set()
        self.gone: set[str] = set()       # trials that ended (error, removal) before their rung
        self._loaded = False

    # -- state ----------------------------------------------------------------------------------------
    def _state_path(self) -> str:
        return storage.join(self.exp_dir, SHA_STATE_FILE)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if storage.exists(self._state_path()):
            s = json.loads(storage.read_text(self._state_path()))
            self.expected, self.records, self.level = s["expected"], s["records"], s["level"]
            self.stopped, self.gone = set(s["stopped"]), set(s["gone"])

    def _save(self) -> None:
        storage.write_text(self._state_path(), json.dumps({
            "rungs": self.rungs, "expected": self.expected, "records": self.records, "level": self.level,
            "stopped": sorted(self.stopped), "gone": sorted(self.gone)}))

    def waiting(self, trial_id: str) -> bool:
        """Reported at its current rung, which is not decided yet."""
        k = self.level.get(trial_id, 0)
        return k < len(self.rungs) and trial_id in self.records[k]

    # -- Tune's calls ---------------------------------------------------------------------------------
    def set_search_properties(self, metric, mode, **spec) -> bool:
        self._mode = mode or self._mode
        return super().set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._load()
        self.level.setdefault(trial.trial_id, 0)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        tid = trial.trial_id
        if tid in self.stopped:
            return TrialScheduler.STOP
        if self.waiting(tid):  # a result that came after its rung's report, before the pause took effect
            return TrialScheduler.PAUSE
        k, step = self.level.get(tid, 0), result.get(self.time_attr)
        if step is not None and step >= self.max_t:
            return TrialScheduler.STOP  # ran the whole way (max_t may be below train.max_steps)
        if k >= len(self.rungs) or step is None or step < self.rungs[k]:
            return TrialScheduler.CONTINUE
        value, sign = result.get(self._metric), (1.0 if self._mode == "min" else -1.0)
        self.records[k][tid] = sign * value if isinstance(value, (int, float)) else math.inf
        action = TrialScheduler.PAUSE
        if len(self.records[k]) >= self.expected[k]:
            action = self._decide(tune_controller, k, tid)
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._drop(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._drop(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._drop(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        if sum(t.status == Trial.RUNNING for t in tune_controller.get_trials()) >= self.max_running:
            return None
        for status in (Trial.PENDING, Trial.PAUSED):
            for trial in tune_controller.get_trials():
                if trial.status != status:
                    continue
                if trial.trial_id in self.stopped:  # a stop decided before a restore: carry it out
                    _stop(tune_controller, trial)
                elif not self.waiting(trial.trial_id):
                    return trial
        return None

    def debug_string(self) -> str:
        done = [len(r) for r in self.records]
        return f"Successive halving: rungs {self.rungs}, reported {done} of {self.expected}."

    # -- the halving ----------------------------------------------------------------------------------
    def _drop(self, tune_controller, trial: Trial) -> None:
        """A trial that ended without reporting at its rung no longer holds the rung up."""
        tid = trial.trial_id
        k = self.level.get(tid, 0)
        if tid in self.stopped or tid in self.gone or k >= len(self.rungs) or tid in self.records[k]:
            return
        self.gone.add(tid)
        self.expected[k] -= 1
        if self.records[k] and len(self.records[k]) >= self.expected[k]:
            self._decide(tune_controller, k, None)
        self._save()

    def _decide(self, tune_controller, k: int, current: str | None) -> str:
        """Rung k is complete: promote the best, stop the rest. Returns the action for `current`."""
        ranked = sorted(self.records[k], key=lambda t: self.records[k][t])
        keep = max(1, int(len(ranked) // self.factor))
        winners, losers = ranked[:keep], ranked[keep:]
        for tid in winners:
            self.level[tid] = k + 1
        if k + 1 < len(self.rungs):
            self.expected[k + 1] = len(winners)
        by_id = {t.trial_id: t for t in tune_controller.get_trials()}
        for tid in losers:
            self.stopped.add(tid)
            storage.write_text(stop_marker(self.exp_dir, tid), json.dumps({"step": self.rungs[k]}))
            t = by_id.get(tid)
            if tid != current and t is not None and (t.status == Trial.PAUSED or t.is_saving
                                                     or t.status == Trial.PENDING):
                _stop(tune_controller, t)
        return TrialScheduler.STOP if current in losers else TrialScheduler.CONTINUE


def _stop(tune_controller, trial: Trial) -> None:
    """Stop a paused (or pending) trial, and have Tune save its new status. Tune's `stop_trial` marks a trial
    for its next experiment-state save only while the trial has an actor: a paused trial whose actor is gone
    would stay PAUSED on disk (for a restore and ExperimentAnalysis) though it is stopped. Ray's own
    HyperBandScheduler stops paused trials the same way and has the same gap."""
    tune_controller.stop_trial(trial)
    controller = getattr(tune_controller, "_tune_controller", tune_controller)  # past the scheduler's API wrapper
    mark = getattr(controller, "_mark_trial_to_checkpoint", None)
    if mark is not None:
        mark(trial)


def build_scheduler(job, exp_dir: str, concurrency: int):
    """The scheduler `tune.scheduler` names (None: Tune's FIFO); `concurrency`: trials running at once."""
    s = job.tune.scheduler
    max_t = s.max_t or job.max_steps
    if s.name == "sha":
        return SuccessiveHalving(exp_dir, num_trials=job.num_trials,
                                 grace_period=s.grace_period, reduction_factor=s.reduction_factor, max_t=max_t,
                                 max_running=concurrency)
    if s.name == "asha":
        return RungStopScheduler(exp_dir, time_attr="step", max_t=max_t, grace_period=s.grace_period,
                                 reduction_factor=s.reduction_factor)
    return None
