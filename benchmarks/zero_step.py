"""DeepSpeed ZeRO-2's own per-step cost for a LoRA, in one process (no Ray Train, no other worker): the DDP
engine (torch AdamW and clipping), ZeRO-2 with contiguous gradient buckets (DeepSpeed's usual layout, and
diffray's before adapters got their own) and ZeRO-2 with the gradients in place (diffray's layout for
trainable sets up to `zero.SMALL_GRADIENTS` elements), on a one-rank gloo group as Ray Train sets up for one
worker. Same tiny model, batch and seed for all three; the variants run interleaved. With `--in-ray-task` the
same runs in a Ray task: a worker process, at Ray's worker priority (niceness 15, `RAY_worker_niceness`) beside
Ray's own processes at 0, as Ray Train's worker runs.

    .venv/bin/python benchmarks/zero_step.py [--steps 30] [--rounds 4] [--batch 4] [--threads 1] [--in-ray-task]

Prints the median step (forward, backward, optimizer) per variant and writes benchmarks/results/zero_step.json.
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
import torch
import torch.distributed as dist

from diffray.data.sample import write_sample_dataset
from diffray.models.loading import resolve_model_path
from diffray.trainers import engine as engine_module
from diffray.trainers.components.zero import build_deepspeed_config
from diffray.trainers.datasets import build_dataset
from diffray.trainers.lora.task import LoraTask
from diffray.trainers.session import WorkerEnv

from common import init_ray  # benchmarks/common.py: the script's folder is on sys.path
from train_overhead import REPO, make_cfg, one_rank_engine, one_rank_group

VARIANTS = (("ddp", "ddp"), ("zero2_contiguous", "deepspeed"), ("zero2_in_place", "deepspeed"))


def contiguous_config(*args, **kwargs) -> dict:
    """The ZeRO config without the trainable size: contiguous, reduce-scattered gradients."""
    return build_deepspeed_config(*args[:8])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="measured steps per variant and round")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no core shared with the rest)")
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--in-ray-task", action="store_true",
                    help="measure in a Ray task (a worker process, at Ray's worker priority, as Ray Train's worker "
                         "runs) instead of in this process")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "zero_step.json"))
    args = ap.parse_args()
    os.environ.setdefault("DIFFRAY_CACHE", str(REPO / ".cache" / "diffray"))
    init_ray(num_cpus=2 + args.threads if args.in_ray_task else 2)  # Ray Data reads the sample set
    if args.in_ray_task:
        path = os.pathsep.join(x for x in (str(REPO / "benchmarks"), os.environ.get("PYTHONPATH")) if x)
        env = {"DIFFRAY_CACHE": os.environ["DIFFRAY_CACHE"], "PYTHONPATH": path}
        record = ray.get(ray.remote(num_cpus=args.threads, runtime_env={"env_vars": env})(measure).remote(args))
    else:
        record = measure(args)
    print(f"LoRA: {record['trainable_elements']} trainable elements in {record['trainable_tensors']} tensors; "
          f"batch {args.batch}, {args.threads} thread(s), niceness {record['niceness']}")
    print(f"{'variant':<18}{'median step (ms)':>18}{'over DDP (ms)':>15}{'ratio vs DDP':>14}")
    for name, row in record["results"].items():
        print(f"{name:<18}{row['median_step_ms']:>18.2f}{row['over_ddp_ms']:>15.2f}{row['ratio_vs_ddp']:>14.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **record, "torch": torch.__version__}, indent=2))
    print(f"wrote {out}")


def measure(args) -> dict:
    """The three engines stepped interleaved in this process; returns the record main() prints and writes."""
    torch.set_num_threads(args.threads)
    one_rank_group()
    storage = tempfile.mkdtemp(prefix="diffray-bench-")
    atexit.register(shutil.rmtree, storage, ignore_errors=True)
    data = str(write_sample_dataset(Path(storage) / "data", num_images=args.num_images) / "train")
    total = args.rounds * args.steps + 10
    runs = {}
    for name, strategy in VARIANTS:
        cfg = make_cfg(storage, name, total, strategy, args.batch, data)
        model_path = resolve_model_path(cfg.model.path)
        torch.manual_seed(0)
        task = LoraTask(cfg, model_path, WorkerEnv(0, 1, torch.device("cpu"), "fp32"))
        if name == "zero2_contiguous":
            engine_module.build_deepspeed_config = contiguous_config
        try:
            engine = one_rank_engine(task.module, cfg)  # looks up engine_module.build_deepspeed_config
        finally:
            engine_module.build_deepspeed_config = build_deepspeed_config
        trainable = sum(p.numel() for p in engine.trainable_parameters())
        runs[name] = (task, engine, trainable, len(engine.trainable_parameters()))
    batch = next(iter(build_dataset(cfg, model_path).iter_torch_batches(batch_size=args.batch, drop_last=True)))

    def step(name: str, i: int) -> float:
        task, engine = runs[name][:2]
        t0 = time.perf_counter()
        loss = task.losses(engine, batch, i).mean()
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name, _ in VARIANTS}
    for name in times:  # warm-up
        for i in range(3):
            step(name, i)
    for r in range(args.rounds):
        for name in times:
            times[name] += [step(name, 3 + r * args.steps + i) for i in range(args.steps)]
    base = statistics.median(times["ddp"])
    results = {name: {"median_step_ms": 1000 * statistics.median(v),
                      "over_ddp_ms": 1000 * (statistics.median(v) - base),
                      "ratio_vs_ddp": statistics.median(v) / base, "steps_measured": len(v)}
               for name, v in times.items()}
    dist.destroy_process_group()
    _, _, trainable, tensors = runs["zero2_in_place"]
    return {"trainable_elements": trainable, "trainable_tensors": tensors, "niceness": os.nice(0), "results": results}


if __name__ == "__main__":
    main()
