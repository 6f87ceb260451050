"""Ray Tune over real trainers on the local cluster: a 4 ranks x 2 learning rates search with ASHA, the
results table and plots, the best adapter in stock diffusers, the best config rerun to the same val_loss,
a failed trial reported beside the others, and the experiment rerun: the failed trial resumes from its own
mid-trial checkpoint and the finished one is not run again."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from diffray.methods import load_config
from diffray.tune.config import load_tune_job

REPO = Path(__file__).resolve().parents[2]
DIFFRAY = str(Path(sys.executable).parent / "diffray")
# Short trials: validation (ASHA's reports) every 3 steps, rungs at 3 and 6 of 12 steps.
QUICK = ["train.max_steps=12", "train.validate_every=3", "train.log_every=3", "train.checkpoint_every=12",
         "tune.scheduler.grace_period=3", "tune.scheduler.reduction_factor=2", "strategy.name=ddp"]
# The README's search on half its grid (ranks 4 and 16 of 4-32, both learning rates): 4 trials instead of 8,
# for the slow suite's budget. One trial at a time: ASHA judges a trial against those that reached its rung
# before it, so with trials running side by side whether any is stopped depended on which arrived first (all
# four completed in one CI run). Run one at a time in the seeded grid order, each trial's losses fixed by its
# seed, the search stops the same trials every run (asserted: some stopped, some completed). `same_as` kept.
RANKS, LRS = (4, 16), (3.0e-4, 3.0e-3)
HALF_GRID = [f"tune.space={{lora.rank: {{grid: {list(RANKS)}}}, optim.lr: {{grid: {list(LRS)}}}, "
             "lora.alpha: {same_as: lora.rank}}", "tune.max_concurrent_trials=1"]


def readme_tune_lines() -> list[list[str]]:
    """The README's tune block (marked as run here): `diffray tune CONFIG ...` then `diffray tune results DIR`."""
    import re
    import shlex

    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- test: skip \(tests/integration/test_tune.py[^\n]*\n```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no tune block marked as run by tests/integration/test_tune.py"
    lines = [shlex.split(line.split("#")[0]) for line in block.group(1).splitlines() if line.strip()]
    assert [x[:2] for x in lines] == [["diffray", "tune"], ["diffray", "tune"]] and lines[1][2] == "results", lines
    return lines


def tune_job(tmp_path: Path, config: str, tune: dict, overrides: list[str]):
    """The shipped `configs/<config>` with its `tune:` section updated by `tune`, loaded with `overrides`."""
    data = yaml.safe_load((REPO / "configs" / config).read_text())
    data["tune"] = {**data.get("tune", {}), **tune}
    path = tmp_path / f"tune-{config}"
    path.write_text(yaml.safe_dump(data))
    return load_tune_job(path, overrides)


@pytest.mark.slow
@pytest.mark.eval  # CI: a search through Tune (the tune_schedulers benchmark at toy size), ASHA records (unit)
def test_asha_search_exports_a_best_adapter_that_loads_and_reruns(ray_cluster, tmp_path, tiny_model_path):
    """The README's tune lines, run as written from a folder holding configs/ (joining the test cluster, as
    under `ray job submit`), with shorter rungs and half the grid appended; then the search read back and its
    best adapter and config checked."""
    import shutil

    import ray
    from diffusers import StableDiffusionPipeline

    from diffray.trainers.runner import run_training
    from diffray.tune.results import read_experiment

    search, results = readme_tune_lines()
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run([DIFFRAY, *search[1:], *QUICK, *HALF_GRID], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exp = tmp_path / results[3]
    job, rows = read_experiment(str(exp))
    assert len(rows) == 4 and {(r.params["lora.rank"], r.params["optim.lr"]) for r in rows} == {
        (r, lr) for r in RANKS for lr in LRS}
    assert all(r.params["lora.alpha"] == r.params["lora.rank"] for r in rows)  # same_as resolved per trial
    early = [r for r in rows if r.stopped_early]
    done = [r for r in rows if r.status == "completed"]
    assert early and done and len(early) + len(done) == 4, [(r.trial_id, r.status, r.steps) for r in rows]
    assert all(r.steps < 12 for r in early) and all(r.steps == 12 for r in done)
    assert all(r.history and r.history[0][0] == 3 for r in rows)  # every trial reported from the first rung
    best = rows[0]  # the table is sorted best first
    assert best.metric == min(r.metric for r in done) and math.isfinite(best.metric)
    assert f"4 trials ({len(done)} completed, {len(early)} stopped early)" in proc.stdout, proc.stdout[-2000:]
    assert f"best: {best.trial_id} " in proc.stdout and f"artifact: {exp / 'best' / 'artifact'}" in proc.stdout

    table = pq.read_table(exp / "results.parquet").to_pylist()
    assert [t["trial_id"] for t in table] == [r.trial_id for r in rows]
    assert sum(t["stopped_early"] for t in table) == len(early) and table[0]["val_loss"] == best.metric
    assert (exp / "results.csv").read_text().count("\n") == 5
    for png in ("metric_vs_step.png", "metric_vs_params.png"):
        assert (exp / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best_artifact, best_config = exp / "best" / "artifact", exp / "best" / "config.yaml"

    # The best adapter in stock diffusers, on the base configs/tune_lora.yaml trains (the pretrained
    # builtin:tiny), changes the image; its config reruns to the same val_loss.
    from diffray.models.adapters import read_card
    from diffray.models.loading import resolve_model_path

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_path(read_card(best_artifact)["base_model"]),
                                                   safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: pipe("a red circle", num_inference_steps=3, height=64, width=64, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images[0]
    base = gen()
    pipe.load_lora_weights(best_artifact)
    assert abs(gen() - base).max() > 1e-3
    card = json.loads((best_artifact / "diffray_card.json").read_text())
    assert card["config"]["lora"]["rank"] == best.params["lora.rank"]
    cfg = load_config(best_config, [f"run.storage_path={tmp_path / 'rerun'}"])
    assert (cfg.lora.rank, cfg.optim.lr, cfg.train.max_steps) == (best.params["lora.rank"], best.params["optim.lr"], 12)
    rerun = run_training(cfg)
    assert abs(rerun.metrics["val_loss"] - best.metric) < 1e-6, (rerun.metrics["val_loss"], best.metric)

    # `diffray tune results DIR` reads the same table back from the directory alone.
    proc = subprocess.run([DIFFRAY, *results[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["trial_id", "lora.rank", "optim.lr", "lora.alpha"]
    assert lines[1].split()[0] == best.trial_id and len([x for x in lines if "stopped early" in x]) == len(early)


@pytest.mark.slow
@pytest.mark.eval  # CI: a trial through Tune in the tune_schedulers benchmark smoke
def test_a_failed_trial_is_reported_and_resumes_from_its_own_checkpoint(ray_cluster, tmp_path):
    """Two trials, one at a time; rank 0 of each is SIGKILLed once before step 9, once Ray has registered
    the step-6 checkpoint. failure.max_failures=1 restarts that trial's workers from it; =0 fails the trial: the search
    still finishes, reports the other trial and names the failure. Rerunning the command restores the
    experiment: the failed trial resumes from its step-6 checkpoint and the finished one is not run again."""
    import ray
    from testkit.faults import fault_env

    from diffray.tune.results import read_experiment

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    data = yaml.safe_load((REPO / "configs" / "tune_lora.yaml").read_text())
    data["tune"]["space"] = {"failure.max_failures": {"grid": [1, 0]}}
    config = tmp_path / "tune_resume.yaml"
    config.write_text(yaml.safe_dump(data))
    args = [DIFFRAY, "tune", str(config), f"run.storage_path={tmp_path}", "run.name=resume", *QUICK,
            "train.checkpoint_every=6", "tune.scheduler.name=fifo", "tune.max_concurrent_trials=1"]
    drill = fault_env(kill_rank_at_step={"rank": 0, "step": 9, "registered": 6})
    first = subprocess.run(args, cwd=REPO, env={**env, **drill}, capture_output=True, text=True,
                           timeout=600, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 trials (1 completed, 0 stopped early)" in first.stdout, first.stdout
    exp, runs = tmp_path / "resume", tmp_path / "resume" / "train_runs"
    rows = {r.params["failure.max_failures"]: r for r in read_experiment(str(exp))[1]}
    done, failed = rows[1], rows[0]
    assert (done.status, done.steps, _starts(runs / f"trial-{done.trial_id}")) == ("completed", 12, [0, 6])
    assert failed.status == "error" and not failed.stopped_early and failed.steps == 6, failed
    assert f"trial {failed.trial_id} failed: worker rank 0" in failed.error and "died" in failed.error, failed.error
    assert [s for s, _ in failed.history] == [3, 6] and _losses(runs / f"trial-{failed.trial_id}") == [1, 3, 6]
    done_log = (runs / f"trial-{done.trial_id}" / "logs" / "metrics.jsonl").read_text()
    snapshot = runs / f"trial-{failed.trial_id}" / "checkpoint_manager_snapshot.json"
    snapshot.write_bytes(snapshot.read_bytes()[:100])  # torn by a crash: Ray's controller of the trial died on it

    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "(resumed)" in second.stdout and "2 trials (2 completed, 0 stopped early)" in second.stdout, second.stdout
    resumed = runs / f"trial-{failed.trial_id}"
    assert _starts(resumed) == [0, 6], "the failed trial restarted from step 0, not from its step-6 checkpoint"
    assert _losses(resumed) == [1, 3, 6, 9, 12]  # steps 7-12 ran once, after the step-6 checkpoint
    assert len(list(snapshot.parent.glob(f"{snapshot.name}.damaged-*"))) == 1  # the torn one kept aside
    assert (runs / f"trial-{done.trial_id}" / "logs" / "metrics.jsonl").read_text() == done_log, \
        "the finished trial was run again"
    rows = {r.params["failure.max_failures"]: r for r in read_experiment(str(exp))[1]}
    assert [(r.status, r.steps, r.error) for r in rows.values()] == [("completed", 12, None)] * 2


def _metrics(run_dir: Path) -> list[dict]:
    metrics = run_dir / "logs" / "metrics.jsonl"
    return [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.is_file() else []


def _starts(run_dir: Path) -> list[int]:
    """The step each start of the run's workers resumed from (0: a fresh start)."""
    return [m["resumed_from_step"] for m in _metrics(run_dir) if m.get("event") == "start"]


def _losses(run_dir: Path) -> list[int]:
    """The steps the run logged a training loss at."""
    return [m["step"] for m in _metrics(run_dir) if "loss" in m]


@pytest.mark.slow
@pytest.mark.eval  # CI: the tune_schedulers benchmark smoke; the trackers' unit tests
@pytest.mark.parametrize("model,family", [("builtin:tiny-sdxl", "stable-diffusion-xl"), ("builtin:tiny-flux", "flux")])
def test_tpe_search_proposes_trials_from_the_space(ray_cluster, tmp_path, model, family):
    """On an SDXL and a Flux model (the shipped job with model.path changed: Tune is the same for every family;
    Flux's val_loss is its flow-matching loss)."""
    from diffray.models.adapters import read_card
    from diffray.tune.runner import run_tune

    space = {"lora.rank": {"choice": [4, 8]}, "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
             "lora.alpha": {"same_as": "lora.rank"}}
    job = tune_job(tmp_path, "tune_lora.yaml", dict(search="tpe", num_samples=2, max_concurrent_trials=1,
                                                    scheduler={"name": "fifo"}, space=space),
                   [f"run.storage_path={tmp_path}", "run.name=tpe", "train.max_steps=6", "train.validate_every=3",
                    "train.checkpoint_every=6", "strategy.name=ddp", "tracking.mlflow={}", "tracking.wandb={}",
                    f"model.path={model}"])
    outcome = run_tune(job)
    assert [r.status for r in outcome.rows] == ["completed"] * 2
    assert_one_tracked_run_per_trial(tmp_path / "tpe", outcome.rows)
    lrs = {r.params["optim.lr"] for r in outcome.rows}
    assert len(lrs) == 2 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert all(r.params["lora.rank"] in (4, 8) and r.params["lora.alpha"] == r.params["lora.rank"]
               for r in outcome.rows)
    assert outcome.best is outcome.rows[0] and Path(outcome.best_artifact, "pytorch_lora_weights.safetensors").is_file()
    assert read_card(outcome.best_artifact)["family"] == family


def assert_one_tracked_run_per_trial(exp_dir: Path, rows) -> None:
    """`tracking:` in a search: Tune's MLflow and W&B callbacks log one run per trial (its params and its
    reported val_loss), in the default stores in the experiment's folder; the workers log none."""
    import mlflow

    from testkit import wandb_offline

    mlflow.set_tracking_uri(f"sqlite:///{exp_dir / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["diffray"], output_format="list")
    by_lr = {float(r.data.params["optim.lr"]): r for r in runs}
    assert len(runs) == len(rows) and by_lr.keys() == {r.params["optim.lr"] for r in rows}
    client = mlflow.tracking.MlflowClient()
    for row in rows:
        history = client.get_metric_history(by_lr[row.params["optim.lr"]].info.run_id, "val_loss")
        assert history and history[-1].value == pytest.approx(row.metric, rel=1e-9)
    files = sorted(exp_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == len(rows)
    # each trial's run file once it is complete: W&B's core process may still be writing it when Tune
    # returns (seen in CI on a loaded machine: a file without its history rows yet)
    finals = sorted(wandb_offline.history(wandb_offline.finished(f))[-1]["val_loss"] for f in files)
    assert finals == pytest.approx(sorted(r.metric for r in rows), rel=1e-9)


@pytest.mark.slow
@pytest.mark.eval  # CI: the ASHA and TPE searches (the same trial runner), DDPO's own tests
def test_ddpo_trials_report_the_reward_and_export_the_best_adapter(ray_cluster, tmp_path):
    from diffray.tune.runner import run_tune

    job = tune_job(tmp_path, "ddpo.yaml", {"space": {"optim.lr": {"grid": [1.0e-3, 1.0e-2]}}, "metric": "reward_mean",
                                           "mode": "max", "search": "grid", "scheduler": {"name": "fifo"}},
                   [f"run.storage_path={tmp_path}", "run.name=ddpo", "train.max_steps=3", "train.checkpoint_every=3",
                    "scaling.num_workers=1", "ddpo.reward.actors=1", "ddpo.samples_per_epoch=16"])
    outcome = run_tune(job)
    rows = outcome.rows
    assert [r.status for r in rows] == ["completed"] * 2 and {r.params["optim.lr"] for r in rows} == {1e-3, 1e-2}
    assert all([s for s, _ in r.history] == [1, 2, 3] for r in rows)  # a report every epoch
    assert rows[0].metric >= rows[1].metric and all(math.isfinite(r.metric) for r in rows)  # mode max: best first
    card = json.loads((Path(outcome.best_artifact) / "diffray_card.json").read_text())
    assert card["method"] == "ddpo" and abs(card["reward"]["last_epoch_mean"] - rows[0].metric) < 1e-9


@pytest.mark.slow
@pytest.mark.eval  # CI: test_tune_sha.py runs sha's rungs, pauses and resumes with trials that act as these do
def test_sha_halves_whole_rungs_and_paused_trials_resume_their_runs_from_the_rung(ray_cluster, tmp_path):
    """`scheduler: sha` over real trials: 4 trials, rungs at 2 and 4 of 8 steps, factor 2 (4 -> 2 -> 1), two
    at a time. Each rung is judged on all its trials; a trial paused at a rung restarts, and its Train run
    resumes from the checkpoint it wrote there; the losers are stopped (not left paused)."""
    import ray
    from ray.tune import ExperimentAnalysis

    from diffray.tune.results import read_experiment

    # TUNE_GLOBAL_CHECKPOINT_S=0: Tune saves its state at every step, so stopped losers must not stay paused there
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    args = [DIFFRAY, "tune", str(REPO / "configs" / "tune_lora.yaml"), f"run.storage_path={tmp_path}", "run.name=sha",
            "train.max_steps=8", "train.validate_every=2", "train.log_every=2", "train.checkpoint_every=8",
            "tune.space={lora.rank: {grid: [4, 8]}, optim.lr: {grid: [3.0e-4, 3.0e-3]}}", "strategy.name=ddp",
            "tune.scheduler={name: sha, grace_period: 2, reduction_factor: 2}", "tune.max_concurrent_trials=2"]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 trials (1 completed, 3 stopped early)" in proc.stdout, proc.stdout[-3000:]
    exp, runs = tmp_path / "sha", tmp_path / "sha" / "train_runs"
    rows = read_experiment(str(exp))[1]
    assert sorted(r.steps for r in rows) == [2, 2, 4, 8]  # 16 trial-steps; the grid's 32
    at2 = {r.trial_id: dict(r.history)[2] for r in rows}
    at4 = {r.trial_id: dict(r.history)[4] for r in rows if r.steps >= 4}
    assert set(at4) == set(sorted(at2, key=at2.get)[:2])  # the best half of the whole rung went on
    assert rows[0].steps == 8 and rows[0].trial_id == min(at4, key=at4.get)
    for r in rows:  # every run started once from scratch; any restart resumed from a rung's checkpoint
        starts = _starts(runs / f"trial-{r.trial_id}")
        assert starts[0] == 0 and set(starts[1:]) <= {2, 4} and len(set(starts)) == len(starts), (r, starts)
        assert sorted(set(_losses(runs / f"trial-{r.trial_id}"))) == [1, *range(2, r.steps + 1, 2)], r
    assert sum(len(_starts(runs / f"trial-{r.trial_id}")) for r in rows) > 4, "no trial was paused and resumed"
    assert {t.status for t in ExperimentAnalysis(str(exp)).trials} == {"TERMINATED"}  # none left paused
    assert (exp / "best" / "artifact").is_dir()


@pytest.mark.slow
@pytest.mark.eval  # ~45 s: over the CI budget; CI runs the same upload in e2e/test_cluster.py and test_storage_uri.py
def test_a_search_on_object_storage_keeps_results_best_adapter_and_logs_there(s3, ray_cluster, tmp_path, monkeypatch):
    """No shared filesystem: the experiment on S3 holds its results, the best adapter (whole by its manifest), each
    trial's worker logs and the driver's data reports."""
    from diffray import storage
    from diffray.tune.runner import TRAIN_RUNS_DIR, run_tune

    monkeypatch.chdir(tmp_path)  # a URI run's local logs go under ./runs-logs
    bucket = s3.bucket("tune")
    job = tune_job(tmp_path, "tune_lora.yaml", dict(max_concurrent_trials=1, scheduler={"name": "fifo"}, space={
        "lora.rank": {"grid": [4]}, "lora.alpha": {"same_as": "lora.rank"}}),
                   [f"run.storage_path={bucket}/runs", "run.name=s3", "train.max_steps=4", "train.log_every=1",
                    "train.validate_every=2", "train.checkpoint_every=4", "strategy.name=ddp"])
    outcome = run_tune(job)
    assert [r.status for r in outcome.rows] == ["completed"] and outcome.exp_dir == f"{bucket}/runs/s3"
    keys = s3.keys(outcome.exp_dir)
    exp = outcome.exp_dir[5:]
    assert f"{exp}/best/artifact/{storage.MANIFEST}" in keys and f"{exp}/best/config.yaml" in keys
    trial_logs = [k for k in keys if k.startswith(f"{exp}/{TRAIN_RUNS_DIR}/") and k.endswith("/logs/metrics.jsonl")]
    assert len(trial_logs) == 1, keys
    rows = [json.loads(x) for x in s3.fs.open_input_stream(trial_logs[0]).read().decode().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and "event" not in r] == [1, 2, 3, 4]
    assert any(k.startswith(f"{exp}/data-reports/") for k in keys), keys


# Two or three short trials, one at a time, every trial run to the end (fifo): 6 steps, val_loss at 3 and 6.
SHORT = [*QUICK, "train.max_steps=6", "train.checkpoint_every=6", "tune.scheduler.name=fifo",
         "tune.max_concurrent_trials=1", "tune.shuffle_grid=false"]


@pytest.mark.slow
def test_an_interrupted_search_is_not_reported_as_finished_and_its_rerun_completes_it(ray_cluster, tmp_path):
    """Ctrl-C stops a Tune search gracefully: fit() returns with the state saved and the trials left unrun. That
    search was reported as finished (exit 0, "2 trials (1 completed ...)", its one finished trial exported as
    the best). It is an error now that names the unfinished trials and the rerun, with the results so far
    written and no best; the rerun restores the experiment and runs the rest, the finished trial kept."""
    import signal

    from diffray.tune.results import read_experiment
    from diffray.tune.runner import SearchInterrupted, run_tune

    job = tune_job(tmp_path, "tune_lora.yaml", {"space": {"lora.rank": {"grid": [4, 8, 16]}}},
                   [f"run.storage_path={tmp_path}", "run.name=interrupted", *SHORT])
    exp = tmp_path / "interrupted"
    ended: list[str] = []

    def ctrl_c_after_the_first_trial(trial_id, result, how):
        ended.append(trial_id)
        if len(ended) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Tune's own handler takes it, as in a terminal

    with pytest.raises(SearchInterrupted) as err:
        run_tune(job, on_trial=ctrl_c_after_the_first_trial)
    assert err.value.exit_code == 130 and str(err.value).startswith(
        f"the search of {exp} was interrupted with 2 of its 3 trials unfinished (no best exported; the finished "
        f"ones are in {exp}/results.csv): rerun the same command to resume it"), str(err.value)
    rows = read_experiment(str(exp))[1]
    assert [(r.trial_id, r.status, r.steps) for r in rows if r.status == "completed"] == [(ended[0], "completed", 6)]
    assert ended[0] in (exp / "results.csv").read_text() and not (exp / "best").exists()
    first_log = (exp / "train_runs" / f"trial-{ended[0]}" / "logs" / "metrics.jsonl").read_text()

    outcome = run_tune(job)
    assert outcome.restored and [(r.status, r.steps) for r in outcome.rows] == [("completed", 6)] * 3
    assert sorted(r.params["lora.rank"] for r in outcome.rows) == [4, 8, 16]
    assert (Path(outcome.best_artifact) / "diffray_card.json").is_file()
    assert (exp / "train_runs" / f"trial-{ended[0]}" / "logs" / "metrics.jsonl").read_text() == first_log, \
        "the trial that finished before the interruption was run again"


@pytest.mark.slow
def test_a_search_over_list_values_writes_its_table_and_exports_the_best(ray_cluster, tmp_path):
    """A space over a list-valued setting (LoRA's target modules), one of whose values fails in the workers (a
    module the UNet does not have). The search ran, then ended in an internal error (`ArrowInvalid: Unsupported
    Type: list<item: string>` writing results.csv): no table, no plots, and `diffray tune results` failed the same
    way. Lists are written as their JSON text; the failed trial is in the table with its error, the other exported."""
    from diffray.tune.results import format_table, read_experiment
    from diffray.tune.runner import run_tune

    job = tune_job(tmp_path, "tune_lora.yaml",
                   {"space": {"lora.target_modules": {"grid": [["no_such_module"], ["to_q", "to_v"]]}}},
                   [f"run.storage_path={tmp_path}", "run.name=lists", *SHORT])
    outcome = run_tune(job)
    exp = tmp_path / "lists"
    done, failed = outcome.rows
    assert (done.status, done.steps, failed.status) == ("completed", 6, "error") and outcome.best is done
    assert done.params["lora.target_modules"] == ["to_q", "to_v"] and "no_such_module" in failed.error
    assert yaml.safe_load(Path(outcome.best_config).read_text())["lora"]["target_modules"] == ["to_q", "to_v"]
    table = pq.read_table(exp / "results.parquet").to_pylist()
    assert [(t["lora.target_modules"], t["status"]) for t in table] == [('["to_q","to_v"]', "completed"),
                                                                        ('["no_such_module"]', "error")]
    assert "no_such_module" in table[1]["error"] and (exp / "results.csv").read_text().count("\n") == 3
    assert (exp / "plots" / "metric_vs_params.png").is_file()
    printed = format_table(outcome.rows, "val_loss").splitlines()
    assert printed[1].split()[:2] == [done.trial_id, '["to_q","to_v"]'], printed
    # the failed trial's error is printed, not only kept in results.csv (the console said "no result")
    assert printed[3].startswith(f"trial {failed.trial_id} failed: ") and "no_such_module" in printed[3], printed
    assert format_table(read_experiment(str(exp))[1], "val_loss").splitlines() == printed  # `diffray tune results`


def test_tunes_own_output_is_off_unless_verbose(ray_cluster, tmp_path, capfd, monkeypatch):
    """Ray 2.60's output engine printed its experiment box, the results folder and a TensorBoard command under
    /tmp/ray on every `diffray tune`, at verbose=0 too (its experiment_started checks no verbosity): the table
    and lines diffray prints were buried. Under `quiet_tune_output` a search prints nothing of its own."""
    from ray import tune

    from diffray.tune.runner import quiet_tune_output

    monkeypatch.delenv("RAY_AIR_NEW_OUTPUT", raising=False)
    monkeypatch.delenv("DIFFRAY_VERBOSE", raising=False)

    def trial(config):  # nested: pickled by value (the workers cannot import this test module)
        tune.report({"loss": float(config["x"])})

    def search(name: str) -> str:
        capfd.readouterr()
        tune.Tuner(trial, param_space={"x": tune.grid_search([1, 2])},
                   run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0)).fit()
        return capfd.readouterr().out

    with quiet_tune_output():
        quiet = search("quiet")
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ, "the setting is the search's only"
    assert quiet.strip() == "", quiet
    assert "Configuration for experiment" in search("ray-default")  # what it hides: still there in Ray
