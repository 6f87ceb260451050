"""Ray Tune over real trainers on the local cluster: a 4 ranks x 2 learning rates search with ASHA, the
results table and plots, the best adapter in stock diffusers, the best config rerun to the same val_loss,
and a driver killed mid-experiment then restored without rerunning finished trials."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
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


@pytest.mark.slow
def test_asha_search_exports_a_best_adapter_that_loads_and_reruns(ray_cluster, tmp_path, tiny_model_path):
    from diffusers import StableDiffusionPipeline

    from diffray.trainers.runner import run_training
    from diffray.tune.runner import run_tune

    job = load_tune_job(REPO / "configs" / "tune_lora.yaml", [f"run.storage_path={tmp_path}", *QUICK])
    outcome = run_tune(job)
    rows = outcome.rows
    assert len(rows) == 8 and {(r.params["lora.rank"], r.params["optim.lr"]) for r in rows} == {
        (r, lr) for r in (4, 8, 16, 32) for lr in (3e-4, 3e-3)}
    assert all(r.params["lora.alpha"] == r.params["lora.rank"] for r in rows)  # same_as resolved per trial
    early = [r for r in rows if r.stopped_early]
    done = [r for r in rows if r.status == "completed"]
    assert early and done and len(early) + len(done) == 8, [(r.trial_id, r.status, r.steps) for r in rows]
    assert all(r.steps < 12 for r in early) and all(r.steps == 12 for r in done)
    assert all(r.history and r.history[0][0] == 3 for r in rows)  # every trial reported from the first rung
    best = outcome.best
    assert best is rows[0] and best.metric == min(r.metric for r in done) and math.isfinite(best.metric)

    exp = Path(outcome.exp_dir)
    table = pq.read_table(exp / "results.parquet").to_pylist()
    assert [t["trial_id"] for t in table] == [r.trial_id for r in rows]
    assert sum(t["stopped_early"] for t in table) == len(early) and table[0]["val_loss"] == best.metric
    assert (exp / "results.csv").read_text().count("\n") == 9
    for png in ("metric_vs_step.png", "metric_vs_params.png"):
        assert (exp / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The best adapter in stock diffusers changes the image; its config reruns to the same val_loss.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: pipe("a red circle", num_inference_steps=3, height=64, width=64, output_type="np",  # noqa: E731
                       generator=torch.Generator().manual_seed(0)).images[0]
    base = gen()
    pipe.load_lora_weights(outcome.best_artifact)
    assert abs(gen() - base).max() > 1e-3
    card = json.loads((Path(outcome.best_artifact) / "diffray_card.json").read_text())
    assert card["config"]["lora"]["rank"] == best.params["lora.rank"]
    cfg = load_config(outcome.best_config, [f"run.storage_path={tmp_path / 'rerun'}"])
    assert (cfg.lora.rank, cfg.optim.lr, cfg.train.max_steps) == (best.params["lora.rank"], best.params["optim.lr"], 12)
    rerun = run_training(cfg)
    assert abs(rerun.metrics["val_loss"] - best.metric) < 1e-6, (rerun.metrics["val_loss"], best.metric)

    # `diffray tune results DIR` reads the same table back from the directory alone.
    proc = subprocess.run([DIFFRAY, "tune", "results", str(exp)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:4] == ["trial_id", "lora.rank", "optim.lr", "lora.alpha"]
    assert lines[1].split()[0] == best.trial_id and len([x for x in lines if "stopped early" in x]) == len(early)


@pytest.mark.slow
def test_driver_killed_mid_experiment_restores_without_rerunning_finished_trials(ray_cluster, tmp_path):
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    # Three trials, one at a time, no early stopping: the kill lands after the first has finished.
    data = yaml.safe_load((REPO / "configs" / "tune_lora.yaml").read_text())
    data["tune"]["space"].update({"lora.rank": {"grid": [4, 8, 16]}, "optim.lr": {"grid": [1.0e-3]}})
    config = tmp_path / "tune_restore.yaml"
    config.write_text(yaml.safe_dump(data))
    args = [DIFFRAY, "tune", str(config), f"run.storage_path={tmp_path}", "run.name=restore", *QUICK,
            "tune.scheduler.name=fifo", "tune.max_concurrent_trials=1"]
    exp, train_runs = tmp_path / "restore", tmp_path / "restore" / "train_runs"
    driver = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and not _terminated(exp):  # finished as Tune's saved state records it
        time.sleep(0.5)
        assert driver.poll() is None, "driver ended before it was killed"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = [f"trial-{t}" for t in _terminated(exp)]
    assert len(finished) == 1, "the kill landed after the first trial and before the last"
    before = {name: _losses(train_runs / name) for name in finished}
    assert all(losses[-1] == 12 for losses in before.values())

    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(resumed)" in proc.stdout and "3 trials (3 completed, 0 stopped early)" in proc.stdout, proc.stdout
    assert len(_finished_runs(train_runs)) == 3
    for name, losses in before.items():
        assert _losses(train_runs / name) == losses, f"{name} finished before the kill and was run again"


def _terminated(exp: Path) -> list[str]:
    """Trial ids that the experiment's latest saved state records as finished (TERMINATED)."""
    states = sorted(exp.glob("experiment_state-*.json"))
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]] if states else []
    except (ValueError, KeyError, OSError):  # caught mid-write
        return []
    return [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]


def _finished_runs(train_runs: Path) -> list[str]:
    """Trial runs whose metrics log has its last step (12)."""
    return sorted(p.name for p in train_runs.glob("trial-*") if 12 in _losses(p))


def _losses(run_dir: Path) -> list[int]:
    metrics = run_dir / "logs" / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]


@pytest.mark.slow
def test_tpe_search_proposes_trials_from_the_space(ray_cluster, tmp_path):
    from diffray.tune.runner import run_tune

    data = yaml.safe_load((REPO / "configs" / "tune_lora.yaml").read_text())
    data["tune"].update(search="tpe", num_samples=3, max_concurrent_trials=1, scheduler={"name": "fifo"})
    data["tune"]["space"] = {"lora.rank": {"choice": [4, 8]}, "optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
                             "lora.alpha": {"same_as": "lora.rank"}}
    config = tmp_path / "tune_tpe.yaml"
    config.write_text(yaml.safe_dump(data))
    job = load_tune_job(config, [f"run.storage_path={tmp_path}", "run.name=tpe", "train.max_steps=6",
                                 "train.validate_every=3", "train.checkpoint_every=6", "strategy.name=ddp"])
    outcome = run_tune(job)
    assert [r.status for r in outcome.rows] == ["completed"] * 3
    lrs = {r.params["optim.lr"] for r in outcome.rows}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert all(r.params["lora.rank"] in (4, 8) and r.params["lora.alpha"] == r.params["lora.rank"]
               for r in outcome.rows)
    assert outcome.best is outcome.rows[0] and Path(outcome.best_artifact, "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_ddpo_trials_report_the_reward_and_export_the_best_adapter(ray_cluster, tmp_path):
    from diffray.tune.runner import run_tune

    data = yaml.safe_load((REPO / "configs" / "ddpo.yaml").read_text())
    data["tune"] = {"space": {"optim.lr": {"grid": [1.0e-3, 1.0e-2]}}, "metric": "reward_mean", "mode": "max",
                    "search": "grid", "scheduler": {"name": "fifo"}}
    config = tmp_path / "tune_ddpo.yaml"
    config.write_text(yaml.safe_dump(data))
    job = load_tune_job(config, [f"run.storage_path={tmp_path}", "run.name=ddpo", "train.max_steps=3",
                                 "train.checkpoint_every=3", "scaling.num_workers=1", "ddpo.reward.actors=1",
                                 "ddpo.samples_per_epoch=16"])
    outcome = run_tune(job)
    rows = outcome.rows
    assert [r.status for r in rows] == ["completed"] * 2 and {r.params["optim.lr"] for r in rows} == {1e-3, 1e-2}
    assert all([s for s, _ in r.history] == [1, 2, 3] for r in rows)  # a report every epoch
    assert rows[0].metric >= rows[1].metric and all(math.isfinite(r.metric) for r in rows)  # mode max: best first
    card = json.loads((Path(outcome.best_artifact) / "diffray_card.json").read_text())
    assert card["method"] == "ddpo" and abs(card["reward"]["last_epoch_mean"] - rows[0].metric) < 1e-9
