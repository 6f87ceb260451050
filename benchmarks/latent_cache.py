"""Latent cache speed-up: LoRA training samples/s with `data.cache` on vs off, same model, data, batch
and worker layout, measured side by side in one run (interleaved rounds). The one-time cost of
building the cache (`diffray data prepare`) is reported separately.

    .venv/bin/python benchmarks/latent_cache.py                      # tiny model, CPU
    .venv/bin/python benchmarks/latent_cache.py --model builtin:sd15-shaped --resolution 512 --use-gpu

Prints a table and writes benchmarks/results/latent_cache.json.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray

from diffray.methods import load_config
from diffray.data.sample import write_sample_dataset
from diffray.trainers.datasets import prepare_data
from diffray.trainers.runner import run_training

from common import init_ray  # benchmarks/common.py: the script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]


def make_cfg(args, storage: str, name: str, data: str, cache: str):
    return load_config(REPO / "configs" / "lora.yaml", [
        f"model.path={args.model}", f"data.path={data}", f"data.resolution={args.resolution}", f"data.cache={cache}",
        f"run.storage_path={storage}", f"run.name={name}", f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.batch}", f"train.checkpoint_every={args.steps}", "train.validate_every=null",
        "train.progress_bar=false", "train.log_every=1", f"scaling.num_workers={args.workers}",
        f"scaling.cpus_per_worker={args.cpus_per_worker}", f"scaling.use_gpu={str(args.use_gpu).lower()}",
        "strategy.name=ddp", "failure.max_failures=0"])


def samples_per_s(run_dir: str, warmup: int) -> list[float]:
    lines = (Path(run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return [e["samples_per_s"] for e in map(json.loads, lines) if "samples_per_s" in e][warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:tiny")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cpus-per-worker", type=int, default=2)
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "latent_cache.json"))
    args = ap.parse_args()
    os.environ.setdefault("DIFFRAY_CACHE", str(REPO / ".cache" / "diffray"))
    init_ray()
    storage = tempfile.mkdtemp(prefix="diffray-bench-")
    atexit.register(shutil.rmtree, storage, ignore_errors=True)  # nothing left in /tmp
    data = str(write_sample_dataset(Path(storage) / "data", num_images=args.num_images,
                                    resolution=max(64, args.resolution)) / "train")
    cache_root = str(Path(storage) / "latents")
    t0 = time.perf_counter()
    prepare_data(make_cfg(args, storage, "prepare", data, cache_root))
    prepare_s = time.perf_counter() - t0
    samples: dict[str, list[float]] = {"uncached": [], "cached": []}
    for r in range(args.rounds):
        for variant, cache in (("uncached", "off"), ("cached", cache_root)):
            result = run_training(make_cfg(args, storage, f"{variant}-{r}", data, cache))
            samples[variant] += samples_per_s(result.run_dir, args.warmup)
    ray.shutdown()
    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = med["cached"] / med["uncached"]
    print(f"{'variant':<10}{'median samples/s':>18}{'steps':>7}")
    for k, v in samples.items():
        print(f"{k:<10}{med[k]:>18.2f}{len(v):>7}")
    print(f"cached / uncached samples/s: {ratio:.3f}  (cache build for {args.num_images} images: {prepare_s:.1f}s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "median_samples_per_s": med, "ratio_cached_vs_uncached": ratio,
                               "cache_build_s": prepare_s, "steps_measured": {k: len(v) for k, v in samples.items()},
                               "ray": ray.__version__}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
