"""Ray Train overhead: median LoRA step time of a plain single-process PyTorch loop vs Ray Train with
1 worker (DDP strategy and DeepSpeed ZeRO-2), same tiny model, data, batch and thread count, measured
side by side in one run. Start-up (cluster, worker group, first steps) is excluded.

    .venv/bin/python benchmarks/train_overhead.py [--steps 80] [--warmup 10] [--rounds 3] [--batch-sizes 4 16]
        [--threads 2] [--sched] [--paired [--engine-loop]]

Prints a table and writes benchmarks/results/train_overhead.json. `--sched` also samples every thread on the
machine (Linux /proc) and reports, per variant's measured steps: how often the two busiest threads (the
training thread and torch's other intra-op thread) were preempted per step, the cores they got, and how
often threads machine-wide went to sleep and woke (the other processes' wakeups that preempt them).

`--paired` (writes train_overhead_paired.json) runs each Ray variant with a plain loop of its own taking turns
step by step: before each step the worker waits (the `DIFFRAY_HOOKS` plugin `paired_hooks.py`, outside its
timed step) while this process runs one step of the bare torch loop and, with `--engine-loop`, one of the same
engine (the DDP engine, or DeepSpeed ZeRO-2 on a one-rank gloo group) without Ray Train. The steps of a turn
then see the machine at the same speed, which on a VM drifts by 10-20% within seconds; Ray's other processes
(controller, Ray Data's coordinators) run during every turn, so these ratios are the cost inside the worker's
step, not that of the processes beside it. Over the torch loop it is the issue's figure; over the same engine,
what Ray Train and the worker's loop add to the engine's own cost.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import select
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from diffray.data.sample import write_sample_dataset
from diffray.methods import load_config
from diffray.models.loading import resolve_model_path
from diffray.trainers.datasets import build_dataset
from diffray.trainers.engine import build_engine
from diffray.trainers.lora.task import LoraTask
from diffray.trainers.runner import run_training
from diffray.trainers.session import WorkerEnv

from common import init_ray  # benchmarks/common.py: the script's folder is on sys.path

REPO = Path(__file__).resolve().parents[1]
THREADS = 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_threads() -> dict[str, tuple[int, int, int]]:
    """(CPU ticks, voluntary, involuntary context switches) of every thread on the machine, by "pid/tid"."""
    out = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                switches = [int(line.split()[1]) for line in
                            Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines() if "ctxt_switches" in line]
                out[f"{pid}/{tid}"] = (int(fields[11]) + int(fields[12]), *switches)
        except (OSError, ValueError, IndexError):  # a thread that ended while read
            continue
    return out


class SchedSampler:
    """Every thread's CPU ticks and context switches every `period` s, read back per time window."""

    def __init__(self, period: float = 0.5):
        self.period, self.snaps = period, []
        self.stop = threading.Event()
        threading.Thread(target=self._run, name="sched-sampler", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            self.snaps.append((time.time(), read_threads()))

    def window(self, start: float, end: float, steps: int) -> dict:
        # inside the window: the worker's threads may be gone from a snapshot taken after its last step
        (t0, a), (t1, b) = next(x for x in self.snaps if x[0] >= start), [x for x in self.snaps if x[0] <= end][-1]
        deltas = [tuple(x - y for x, y in zip(v, a[k])) for k, v in b.items() if k in a]
        busiest = sorted(deltas, reverse=True)[:2]
        return {"window_s": t1 - t0, "sleeps_per_s": sum(d[1] for d in deltas) / (t1 - t0),
                "busiest_cores": [d[0] / CLOCK_TICKS / (t1 - t0) for d in busiest],
                "preempted_per_step": [d[2] / steps for d in busiest]}


def make_cfg(storage: str, name: str, steps: int, strategy: str, batch: int, data: str):
    return load_config(REPO / "configs" / "lora.yaml", [f"train.micro_batch_size={batch}", f"data.path={data}",
        f"run.storage_path={storage}", f"run.name={name}", f"train.max_steps={steps}",
        f"train.checkpoint_every={steps}", "train.validate_every=null", "train.progress_bar=false",
        "scaling.num_workers=1", f"scaling.cpus_per_worker={THREADS}", f"strategy.name={strategy}",
        "strategy.zero_stage=2", "failure.max_failures=0"])


def plain_steps(cfg, same_engine: bool = False):
    """The same model, loss and data stream (shuffle buffer included) with a bare torch AdamW loop in this
    process: yields each step's time, data wait and end (time.time()). With `same_engine` the loop steps
    diffray's engine for `cfg.strategy` (DeepSpeed ZeRO-2 or the DDP engine) on a one-rank gloo group in
    this process, as the worker does, without Ray Train or the worker's loop around it."""
    torch.set_num_threads(THREADS)
    model_path = resolve_model_path(cfg.model.path)
    task = LoraTask(cfg, model_path, WorkerEnv(0, 1, torch.device("cpu"), "fp32"))
    params = [p for p in task.module.parameters() if p.requires_grad]
    engine = one_rank_engine(task.module, cfg) if same_engine else None
    opt = None if engine else torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    ds = build_dataset(cfg, model_path)

    def batches():  # the worker's stream: each epoch reshuffled through the same local buffer (data.shuffle_buffer)
        epoch = 0
        while True:
            shuffle = ({"local_shuffle_buffer_size": cfg.data.shuffle_buffer, "local_shuffle_seed": epoch}
                       if cfg.data.shuffle_buffer else {})
            yield from ds.iter_torch_batches(batch_size=cfg.train.micro_batch_size, drop_last=True, **shuffle)
            epoch += 1

    it, step = batches(), 0
    while True:
        step += 1
        t0 = time.perf_counter()
        batch = next(it)
        wait = time.perf_counter() - t0
        if engine is not None:
            engine.backward(task.losses(engine, batch, step).mean())
            engine.step()
        else:
            loss = task.losses(task.module, batch, step).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        yield time.perf_counter() - t0, wait, time.time()


def one_rank_group() -> None:
    """A one-rank gloo group in this process, as Ray Train sets up for one worker (once)."""
    if not dist.is_initialized():
        os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
        store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)


def one_rank_engine(module: torch.nn.Module, cfg):
    """diffray's engine for `cfg.strategy` over `module` in this process, on `one_rank_group()`."""
    one_rank_group()
    return build_engine(module, cfg.strategy, cfg.optim, cfg.train.micro_batch_size, 1, cfg.train.max_steps, "fp32",
                        torch.device("cpu"))


def plain_loop(cfg, steps: int) -> tuple[list[float], list[float], list[float]]:
    """`steps` steps of `plain_steps`: their times, data waits and ends."""
    rows = [row for row, _ in zip(plain_steps(cfg), range(steps))]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def taking_turns(ray_cfg, plain_loops: list[tuple], steps: int,
                 pair_dir: Path) -> tuple[tuple[list, list, list], list[list[float]]]:
    """A Ray Train run and plain loops taking turns step by step (`--paired`): before each of its steps the
    worker waits (`paired_hooks.py`, outside its timed step) while a thread of this process runs one step of
    each plain loop (`plain_steps(cfg, same_engine)` per entry of `plain_loops`, their order rotating turn by
    turn), so the steps of a turn see the machine at the same speed. Returns the Ray run's (times, waits, ends)
    and each plain loop's step times."""
    os.mkfifo(pair_dir / "ready")
    os.mkfifo(pair_dir / "go")
    os.environ.update(DIFFRAY_HOOKS=str(REPO / "benchmarks" / "paired_hooks.py"), DIFFRAY_HOOK_PAIR_DIR=str(pair_dir))
    plain: list[list[float]] = [[] for _ in plain_loops]
    failed: list[BaseException] = []
    done = threading.Event()

    def turns():
        ready = os.open(pair_dir / "ready", os.O_RDONLY | os.O_NONBLOCK)
        go, buffer = None, b""
        try:
            steppers = [plain_steps(cfg, same_engine) for cfg, same_engine in plain_loops]
            for s in range(steps):
                while b"\n" not in buffer:  # the worker's "ready for step s"
                    if done.is_set():
                        return
                    if select.select([ready], [], [], 0.5)[0]:
                        buffer += os.read(ready, 64)
                buffer = buffer[buffer.index(b"\n") + 1:]
                for i in range(len(steppers)):
                    j = (s + i) % len(steppers)
                    plain[j].append(next(steppers[j])[0])
                if go is None:
                    go = open(pair_dir / "go", "w", buffering=1)
                go.write("go\n")
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
            failed.append(exc)
            if go is None:  # let a worker blocked on opening `go` see it closed (its hook then raises)
                deadline = time.time() + 10
                while go is None and time.time() < deadline:
                    try:
                        go = os.fdopen(os.open(pair_dir / "go", os.O_WRONLY | os.O_NONBLOCK), "w")
                    except OSError:
                        time.sleep(0.1)
        finally:
            os.close(ready)
            if go is not None:
                go.close()

    thread = threading.Thread(target=turns, name="plain-turns", daemon=True)
    thread.start()
    try:
        ray_result = ray_loop(ray_cfg)
    finally:
        done.set()
        thread.join(timeout=60)
        for name in ("DIFFRAY_HOOKS", "DIFFRAY_HOOK_PAIR_DIR"):
            os.environ.pop(name, None)
    if failed:
        raise failed[0]
    return ray_result, plain


def ray_loop(cfg) -> tuple[list[float], list[float], list[float]]:
    """The worker's logged step times, within them the waits for micro-batches (`data_time`), and when each
    step was logged (just after it ended)."""
    result = run_training(cfg)
    rows = [json.loads(x) for x in (Path(result.run_dir) / "logs" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step_time" in r]
    return [r["step_time"] for r in rows], [r["data_time"] for r in rows], [r["time"] for r in rows]


def main() -> None:
    global THREADS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of the three variants, "
                    "each round in another order")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 16], help="micro-batch sizes to measure")
    ap.add_argument("--num-images", type=int, default=512, help="sample-set size (epoch length)")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (and the worker's CPUs)")
    ap.add_argument("--sched", action="store_true", help="sample every thread's preemptions and wakeups (/proc)")
    ap.add_argument("--paired", action="store_true", help="each Ray run and a plain loop take turns step by step")
    ap.add_argument("--engine-loop", action="store_true",
                    help="with --paired: a second plain loop in each turn steps the Ray run's engine in this process")
    ap.add_argument("--engine-only", action="store_true",
                    help="with --paired: the one plain loop of each turn steps the Ray run's engine in this process "
                    "(no bare torch loop): the ratio is what Ray Train and the worker's loop add to the engine")
    ap.add_argument("--variants", nargs="+", choices=("ddp", "zero2"), default=["ddp", "zero2"],
                    help="with --paired: the Ray runs to measure")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/train_overhead[_paired].json")
    args = ap.parse_args()
    if args.sched and args.paired:
        ap.error("--sched samples the unpaired runs only; run it without --paired")
    if (args.engine_loop or args.engine_only) and not args.paired:
        ap.error("--engine-loop and --engine-only change the plain loops of --paired; add --paired")
    if args.engine_loop and args.engine_only:
        ap.error("--engine-only pairs with the engine alone; --engine-loop with both: pick one")
    args.out = args.out or str(REPO / "benchmarks" / "results" /
                               ("train_overhead_paired.json" if args.paired else "train_overhead.json"))
    THREADS = args.threads
    sampler = SchedSampler() if args.sched else None
    os.environ.setdefault("DIFFRAY_CACHE", str(REPO / ".cache" / "diffray"))
    init_ray(num_cpus=4)
    storage = tempfile.mkdtemp(prefix="diffray-bench-")
    atexit.register(shutil.rmtree, storage, ignore_errors=True)  # nothing left in /tmp
    data = str(write_sample_dataset(Path(storage) / "data", num_images=args.num_images) / "train")
    if args.paired:
        return paired_main(args, storage, data)
    results = {}
    for b in args.batch_sizes:
        samples: dict[str, list[float]] = {"plain": [], "ray_ddp": [], "ray_zero2": []}
        waits: dict[str, list[float]] = {k: [] for k in samples}
        sched: dict[str, list[dict]] = {k: [] for k in samples}
        per_round: dict[str, list[float]] = {k: [] for k in samples}
        variants = (("plain", "ddp"), ("ray_ddp", "ddp"), ("ray_zero2", "deepspeed"))
        for r in range(args.rounds):
            cut = args.warmup
            # each round starts one variant later (a Latin square over 3 rounds): the machine's speed drifts by
            # 10-20% within seconds here, and a fixed order would tie each variant to one place in every round
            for k, strategy in variants[r % 3:] + variants[:r % 3]:
                cfg = make_cfg(storage, f"{k}{b}-{r}", args.steps, strategy, b, data)
                times, data_waits, ends = plain_loop(cfg, args.steps) if k == "plain" else ray_loop(cfg)
                samples[k] += times[cut:]
                per_round[k].append(1000 * statistics.median(times[cut:]))
                waits[k] += data_waits[cut:]
                if sampler is not None and len(ends) > cut + 1:  # steps cut+1.. end, as measured
                    sched[k].append(sampler.window(ends[cut], ends[-1], len(ends) - cut - 1))
        base = statistics.median(samples["plain"])
        results[f"batch{b}"] = {k: {"median_step_ms": 1000 * statistics.median(v),
                                    "overhead_ms": 1000 * (statistics.median(v) - base),
                                    "mean_step_ms": 1000 * statistics.mean(v),
                                    "median_data_ms": 1000 * statistics.median(waits[k]),
                                    "ratio_vs_plain": statistics.median(v) / base, "steps_measured": len(v),
                                    "round_median_ms": per_round[k],
                                    **({"sched": sched[k]} if sched[k] else {})}
                                for k, v in samples.items()}
    ray.shutdown()
    print_table(results, [("median step (ms)", "median_step_ms", ".2f"), ("mean (ms)", "mean_step_ms", ".2f"),
                          ("data wait (ms)", "median_data_ms", ".2f"), ("overhead (ms)", "overhead_ms", ".2f"),
                          ("ratio vs plain", "ratio_vs_plain", ".3f"), ("steps", "steps_measured", "d")])
    if sampler is not None:
        sampler.stop.set()
        print("\nper round: preempted per step (two busiest threads), their cores, sleeps/s machine-wide")
        for b, rows in results.items():
            for k, row in rows.items():
                for w in row.get("sched", []):
                    print(f"{b[5:]:<7}{k:<12}{' / '.join(f'{x:.0f}' for x in w['preempted_per_step']):>12}"
                          f"{' / '.join(f'{x:.2f}' for x in w['busiest_cores']):>14}{w['sleeps_per_s']:>9.0f}")
    write_results(args, results)


def print_table(results: dict, columns: list[tuple[str, str, str]]) -> None:
    """One row per batch size and variant: `columns` are (heading, the row's key, format spec)."""
    widths = [max(len(heading) + 2, 8) for heading, _, _ in columns]
    print(f"{'batch':<7}{'variant':<12}" + "".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, widths)))
    for b, rows in results.items():
        for k, row in rows.items():
            cells = (f"{row[key]:>{w}{spec}}" for (_, key, spec), w in zip(columns, widths))
            print(f"{b[5:]:<7}{k:<12}" + "".join(cells))


def write_results(args, results: dict, **extra) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "threads": THREADS, **extra, "results": results,
                               "torch": torch.__version__, "ray": ray.__version__}, indent=2))
    print(f"wrote {out}")


def paired_main(args, storage: str, data: str) -> None:
    """`--paired`: Ray + DDP and Ray + ZeRO-2, each run taking turns step by step with a bare torch loop of its
    own (`taking_turns`) and, with `--engine-loop`, also with the same engine (DDP engine or DeepSpeed ZeRO-2)
    stepped in this process (`--engine-only`: with that engine instead of the torch loop). The ratios are the
    Ray steps' median over each plain loop's median (over the torch loop: the issue's figure; over the engine:
    what Ray Train and the worker's loop add to the engine's own cost), and the median of the per-pair ratios
    (Ray step s over the first plain loop's step of the same turn)."""
    results = {}
    for b in args.batch_sizes:
        variants = tuple((f"ray_{v}", {"ddp": "ddp", "zero2": "deepspeed"}[v]) for v in args.variants)
        ray_times: dict[str, list[float]] = {k: [] for k, _ in variants}
        plain_times: dict[str, list[float]] = {k: [] for k in ray_times}
        engine_times: dict[str, list[float]] = {k: [] for k in ray_times}
        for r in range(args.rounds):
            for k, strategy in variants[r % len(variants):] + variants[:r % len(variants)]:
                pair_dir = Path(tempfile.mkdtemp(dir=storage))
                loops = [(make_cfg(storage, f"plain-{k}{b}-{r}", args.steps, strategy if args.engine_only else "ddp",
                                   b, data), args.engine_only)]
                if args.engine_loop:
                    loops.append((make_cfg(storage, f"engine-{k}{b}-{r}", args.steps, strategy, b, data), True))
                (times, _, _), plain = taking_turns(
                    make_cfg(storage, f"{k}{b}-{r}", args.steps, strategy, b, data), loops, args.steps, pair_dir)
                ray_times[k] += times[args.warmup:]
                plain_times[k] += plain[0][args.warmup:len(times)]
                if args.engine_loop:
                    engine_times[k] += plain[1][args.warmup:len(times)]
        results[f"batch{b}"] = {
            k: {"median_step_ms": 1000 * statistics.median(v),
                "plain_median_step_ms": 1000 * statistics.median(plain_times[k]),
                "ratio_vs_plain": statistics.median(v) / statistics.median(plain_times[k]),
                **({"engine_median_step_ms": 1000 * statistics.median(engine_times[k]),
                    "ratio_vs_engine": statistics.median(v) / statistics.median(engine_times[k])}
                   if args.engine_loop else {}),
                "pair_ratio_median": statistics.median(x / y for x, y in zip(v, plain_times[k])),
                "steps_measured": len(v)}
            for k, v in ray_times.items()}
    ray.shutdown()
    engine = [("engine step (ms)", "engine_median_step_ms", ".2f"), ("ratio", "ratio_vs_engine", ".3f")]
    print_table(results, [("Ray step (ms)", "median_step_ms", ".2f"),
                          ("plain step (ms)", "plain_median_step_ms", ".2f"),
                          ("ratio", "ratio_vs_plain", ".3f"), *(engine if args.engine_loop else []),
                          ("pair ratio", "pair_ratio_median", ".3f"), ("steps", "steps_measured", "d")])
    write_results(args, results, paired=True, plain="engine" if args.engine_only else "torch")


if __name__ == "__main__":
    main()
