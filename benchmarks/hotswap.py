"""Serving with `generator.compile`: what a new LoRA costs with and without `generator.hotswap`, on the CPU.

Three engines (`ImageEngine`, what a Generator replica calls) on one tiny model and registry of random
LoRAs, measured in one run: eager; compiled (each LoRA its own PEFT adapter: each new one compiles the UNet
again); compiled with a hotswap slot (every LoRA copied into one slot: nothing compiles after the first
request). Per engine: the first request (the compile), then for each LoRA, made resident first as a
Generator replica does, its first request; then p50s of alternating LoRAs and of the base model.

    .venv/bin/python benchmarks/hotswap.py [--loras 4] [--repeats 5] [--backend inductor]

`--backend aot_eager` only captures graphs (a quick check that the script runs); inductor generates kernels
as on a GPU, with a C++ compiler here; its caches are off, so each engine compiles from nothing. Writes
benchmarks/results/hotswap.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Every compile from nothing: inductor's on-disk caches would let the second engine reuse the first's kernels.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
sys.path.insert(0, str(REPO / "tests"))  # testkit.adapters: random LoRAs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loras", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="timed requests per p50")
    p.add_argument("--steps", type=int, default=4, help="sampler steps per request")
    p.add_argument("--backend", default="inductor", choices=["inductor", "aot_eager"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "hotswap.json"))
    args = p.parse_args()

    import torch
    from torch._dynamo.utils import counters

    from diffray.models.loading import resolve_model_path
    from diffray.serve.config import parse_args
    from diffray.serve.engine import ImageEngine
    from diffray.serve.schemas import Job
    from testkit.adapters import random_lora

    torch.set_num_threads(args.threads)
    model = resolve_model_path("builtin:tiny-random")
    names = [f"lora-{k}" for k in range(args.loras)]
    compiled = {"compile": True, "compile_backend": args.backend}
    engines = {"eager": {}, "compiled": compiled, "compiled_hotswap": {**compiled, "hotswap": {"rank": args.rank}}}
    report: dict = {"backend": args.backend, "loras": args.loras, "rank": args.rank, "steps": args.steps,
                    "threads": args.threads, "torch": torch.__version__, "engines": {}}
    with tempfile.TemporaryDirectory(prefix="diffray-hotswap-") as reg:
        for k, name in enumerate(names):
            random_lora(model, Path(reg) / name, seed=k, rank=args.rank, std=0.05)
        for key, generator in engines.items():
            torch._dynamo.reset()  # each engine compiles from nothing
            engine = ImageEngine(parse_args({"model": model, "adapters_dir": reg, "generator": generator}),
                                 device="cpu")

            def run(adapters=()):
                job = Job(prompt="a red circle", n=1, width=64, height=64, steps=args.steps, guidance=7.5, seed=0,
                          adapters=adapters)
                t0 = time.perf_counter()
                res = engine.run([job])[0]
                if isinstance(res, Exception):
                    raise res
                return time.perf_counter() - t0

            graphs0 = counters["stats"]["unique_graphs"]
            first = run()
            engine.acquire(names)
            firsts = [run(((n, 1.0),)) for n in names]
            graphs = counters["stats"]["unique_graphs"] - graphs0
            alternating = [run(((names[i % len(names)], 1.0),)) for i in range(args.repeats * len(names))]
            base = [run() for _ in range(args.repeats)]
            res = {"first_s": first, "first_of_each_lora_s": firsts, "graphs": graphs,
                   "alternating_p50_s": statistics.median(alternating), "base_p50_s": statistics.median(base)}
            report["engines"][key] = res
            print(f"{key:17s} first {first:7.2f} s  first of each LoRA {' '.join(f'{x:.2f}' for x in firsts)} s  "
                  f"graphs {graphs}  alternating p50 {res['alternating_p50_s'] * 1e3:7.1f} ms  "
                  f"base p50 {res['base_p50_s'] * 1e3:7.1f} ms", flush=True)
            del engine
    e = report["engines"]
    new_lora = {k: statistics.mean(v["first_of_each_lora_s"]) for k, v in e.items()}
    alternating = {k: v["alternating_p50_s"] for k, v in e.items()}
    report["ratios"] = {
        "new_lora_compiled_over_hotswap": new_lora["compiled"] / new_lora["compiled_hotswap"],
        "alternating_hotswap_over_compiled": alternating["compiled_hotswap"] / alternating["compiled"],
        "alternating_hotswap_over_eager": alternating["compiled_hotswap"] / alternating["eager"],
        "base_hotswap_over_compiled": e["compiled_hotswap"]["base_p50_s"] / e["compiled"]["base_p50_s"],
    }
    print("ratios: " + "  ".join(f"{k} {v:.2f}" for k, v in report["ratios"].items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
