"""ASHA against the full grid: the same search space, seeds and trials run twice in one Ray session,
once with every trial to the last step (FIFO) and once with ASHA early stopping. Reports the total
trial-steps each spent, their ratio, and how far ASHA's best val_loss is from the grid's best.

    .venv/bin/python benchmarks/tune_asha.py        # configs/tune_lora.yaml's space: 4 ranks x 2 lrs

Targets (issue): ASHA uses <= 0.35x the grid's trial-steps and its best is within 2% of the grid's.
Prints a table and writes benchmarks/results/tune_asha.json.
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
        f"tune.scheduler.grace_period={args.grace}", f"tune.scheduler.reduction_factor={args.reduction_factor}",
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
    ap.add_argument("--steps", type=int, default=60, help="train.max_steps of every trial (ASHA's max_t)")
    ap.add_argument("--validate-every", type=int, default=5)
    ap.add_argument("--grace", type=int, default=5, help="ASHA grace period (steps)")
    ap.add_argument("--reduction-factor", type=float, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="more overrides of the Tune job, e.g. 'tune.space={lora.rank: {grid: [4, 8]}}'")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "tune_asha.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="diffray-tune-bench-") as storage:
        grid = run(args.config, storage, "grid", args, "fifo")
        asha = run(args.config, storage, "asha", args, "asha")
    ratio = asha["trial_steps"] / grid["trial_steps"]
    gap = (asha["best_val_loss"] - grid["best_val_loss"]) / abs(grid["best_val_loss"])
    print(f"{'scheduler':<10}{'trials':>7}{'completed':>10}{'stopped':>8}{'trial-steps':>12}{'best val_loss':>15}"
          f"{'wall s':>8}")
    for r in (grid, asha):
        print(f"{r['scheduler']:<10}{r['trials']:>7}{r['completed']:>10}{r['stopped_early']:>8}{r['trial_steps']:>12}"
              f"{r['best_val_loss']:>15.6f}{r['wall_s']:>8.1f}")
    print(f"trial-steps ratio asha/grid: {ratio:.3f} (target <= 0.35): {'met' if ratio <= 0.35 else 'NOT met'}")
    print(f"best val_loss gap: {100 * gap:+.3f}% (target within 2%): {'met' if gap <= 0.02 else 'NOT met'}; "
          f"grid best {grid['best_params']}, asha best {asha['best_params']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "grid": grid, "asha": asha,
                                    "trial_steps_ratio": ratio, "best_gap": gap}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
