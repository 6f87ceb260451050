"""DDPO reward overlap: epoch wall time with the reward scored by an asynchronous Ray actor (the next batch
samples while the last is scored) vs scored inline on the training worker, same config otherwise,
measured side by side in one run.

The reward is a real model-based one: `aesthetic` (a LAION-layout MLP head on CLIP image embeddings)
over a small randomly initialised CLIP ViT built here (224 px, patch 16, 4 layers, width 256; no
download), so scoring costs about as much as sampling a batch on the tiny UNet. One training worker
with 1 CPU; the actor gets the other CPU (a 2-CPU local cluster). The first epoch of every run is dropped.

    .venv/bin/python benchmarks/ddpo_overlap.py [--epochs 6] [--rounds 2] [--samples 32] [--batch 8]

Prints a table and writes benchmarks/results/ddpo_overlap.json.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import ray
import torch

from diffray.methods import load_config
from diffray.trainers.runner import run_training

from common import init_ray  # benchmarks/common.py: the script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' helpers (testkit): small models built from code
from testkit.models import build_tiny_clip, write_aesthetic_head  # noqa: E402

PROJ = 64


def build_reward_models(out: Path) -> tuple[str, str]:
    """A small CLIP (ViT-B/16-shaped input, 4 layers of width 256) and an aesthetic head over its
    PROJ-dim embeddings: a real reward model whose cost is visible next to sampling."""
    clip = build_tiny_clip(out / "clip", image_size=224, patch_size=16, vision_width=256, vision_layers=4,
                           projection_dim=PROJ)
    return str(clip), str(write_aesthetic_head(out / "head.safetensors", PROJ))


def make_cfg(storage: str, name: str, actors: int, clip: str, head: str, args):
    return load_config(REPO / "configs" / "ddpo.yaml", [
        f"run.storage_path={storage}", f"run.name={name}", f"train.max_steps={args.epochs}",
        f"train.checkpoint_every={args.epochs}", "train.validate_every=null", "train.progress_bar=false",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", "strategy.name=ddp",
        f"ddpo.samples_per_epoch={args.samples}", f"ddpo.sample_batch_size={args.batch}",
        "ddpo.reward.name=aesthetic", f"ddpo.reward.options={{clip_path: {clip}, head_path: {head}, device: cpu}}",
        f"ddpo.reward.actors={actors}", "ddpo.reward.num_cpus=1"])


def epochs_of(run_dir: str, skip: int) -> list[dict]:
    lines = [json.loads(x) for x in (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if "epoch_time" in e][skip:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=6, help="per run; the first is warm-up and not measured (>= 2)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the two variants")
    ap.add_argument("--samples", type=int, default=32, help="trajectories per epoch (ddpo.samples_per_epoch)")
    ap.add_argument("--batch", type=int, default=8, help="trajectories per sampling batch / reward call")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddpo_overlap.json"))
    args = ap.parse_args()
    os.environ.setdefault("DIFFRAY_CACHE", str(REPO / ".cache" / "diffray"))
    init_ray(num_cpus=2)
    storage = tempfile.mkdtemp(prefix="diffray-bench-")
    atexit.register(shutil.rmtree, storage, ignore_errors=True)  # nothing left in /tmp
    clip, head = build_reward_models(Path(storage) / "reward")
    rows: dict[str, list[dict]] = {"inline": [], "async_actor": []}
    for r in range(args.rounds):
        for variant, actors in (("inline", 0), ("async_actor", 1)):
            result = run_training(make_cfg(storage, f"{variant}-{r}", actors, clip, head, args))
            rows[variant] += epochs_of(result.run_dir, skip=1)
    ray.shutdown()

    def med(variant: str, key: str) -> float:
        return statistics.median(e[key] for e in rows[variant])

    results = {v: {"median_epoch_s": med(v, "epoch_time"), "median_sample_s": med(v, "sample_time"),
                   "median_reward_wait_s": med(v, "reward_wait_time"), "median_train_s": med(v, "train_time"),
                   "epochs_measured": len(rows[v])} for v in rows}
    ratio = results["async_actor"]["median_epoch_s"] / results["inline"]["median_epoch_s"]
    print(f"{'variant':<13}{'epoch (s)':>11}{'sample+submit (s)':>19}{'reward wait (s)':>17}{'PPO (s)':>10}"
          f"{'epochs':>8}")
    for v, row in results.items():
        print(f"{v:<13}{row['median_epoch_s']:>11.3f}{row['median_sample_s']:>19.3f}"
              f"{row['median_reward_wait_s']:>17.3f}{row['median_train_s']:>10.3f}{row['epochs_measured']:>8}")
    print(f"epoch time ratio async/inline = {ratio:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "ratio_async_over_inline": ratio,
                               "torch": torch.__version__, "ray": ray.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
