"""Tune's schedulers against the full grid: the same search space, seeds and trials run in one Ray session,
once with every trial to the last step (FIFO), once with asynchronous ASHA and once with synchronous
successive halving (sha). Reports the trial-steps each spent, their ratio to the grid's, how far each best
val_loss is from the grid's best, and the wall time.

    .venv/bin/python benchmarks/tune_schedulers.py   # configs/tune_lora.yaml's space: 4 ranks x 2 lrs

Targets (issue 22): sha uses <= 0.30x the grid's trial-steps with its best within 2% of the grid's
(ASHA's earlier target was 0.35x). Prints a table and writes benchmarks/results/tune_schedulers.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(config: Path, storage: str, name: str, args, scheduler: str):
    from diffray.tune.config import load_tune_job
    from diffray.tune.runner import run_tune

    job = load_tune_job(config, [
        f"run.storage_path={storage}", f"run.name={name}", f"train.max_steps={args.steps}",
        f"train.validate_every={args.validate_every}", f"train.log_every={args.validate_every}",
        f"train.checkpoint_every={args.steps}", f"tune.scheduler.name={scheduler}",
        *([] if scheduler == "fifo" else [f"tune.scheduler.grace_period={args.grace}",  # fifo has no rungs
                                          f"tune.scheduler.reduction_factor={args.reduction_factor}"]),
        *args.set])
    t0 = time.perf_counter()
    outcome = run_tune(job)
    wall = time.perf_counter() - t0
    rows = outcome.rows
    return {
        "scheduler": scheduler, "trials": len(rows), "trial_steps": sum(r.steps for r in rows),
        "completed": sum(r.status == "completed" for r in rows), "stopped_early": sum(r.stopped_early for r in rows),
        "best_params": outcome.best.params if outcome.best else None,
        "best_val_loss": outcome.best.metric if outcome.best else None, "wall_s": round(wall, 1),
        "concurrency": outcome.concurrency,
        "trials_detail": [{"params": r.params, "steps": r.steps, "val_loss": r.metric, "status": r.status}
                          for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "tune_lora.yaml")
    ap.add_argument("--steps", type=int, default=60, help="train.max_steps of every trial (the schedulers' max_t)")
    ap.add_argument("--validate-every", type=int, default=5)
    ap.add_argument("--schedulers", default="asha,sha", help="compared with the grid (fifo), comma-separated")
    ap.add_argument("--grace", type=int, default=5, help="grace period (steps): the first rung")
    ap.add_argument("--reduction-factor", type=float, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more overrides of the Tune job, e.g. 'tune.space={lora.rank: {grid: [4, 8]}}'")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tune_schedulers.json")
    args = ap.parse_args()

    names = [n for n in args.schedulers.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="diffray-tune-bench-") as storage:
        grid = run(args.config, storage, "grid", args, "fifo")
        others = [run(args.config, storage, name, args, name) for name in names]
    print(f"{'scheduler':<10}{'trials':>7}{'completed':>10}{'stopped':>8}{'trial-steps':>12}{'ratio':>7}"
          f"{'best val_loss':>15}{'gap %':>8}{'wall s':>8}")
    for r in (grid, *others):
        r["trial_steps_ratio"] = r["trial_steps"] / grid["trial_steps"]
        r["best_gap"] = (r["best_val_loss"] - grid["best_val_loss"]) / abs(grid["best_val_loss"])
        print(f"{r['scheduler']:<10}{r['trials']:>7}{r['completed']:>10}{r['stopped_early']:>8}"
              f"{r['trial_steps']:>12}{r['trial_steps_ratio']:>7.3f}{r['best_val_loss']:>15.6f}"
              f"{100 * r['best_gap']:>+8.3f}{r['wall_s']:>8.1f}")
    for r in others:
        target = 0.30 if r["scheduler"] == "sha" else 0.35
        print(f"{r['scheduler']}: trial-steps {r['trial_steps_ratio']:.3f}x the grid's (target <= {target}): "
              f"{'met' if r['trial_steps_ratio'] <= target else 'NOT met'}; best gap {100 * r['best_gap']:+.3f}% "
              f"(target within 2%): {'met' if r['best_gap'] <= 0.02 else 'NOT met'}; best {r['best_params']} "
              f"(grid's {grid['best_params']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "grid": grid,
                                    **{r["scheduler"]: r for r in others}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
