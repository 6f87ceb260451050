"""Worker-side pieces every trainer shares: rank/device setup, the batch stream, metrics logging,
checkpoint save + report + restore, and the fault-injection hooks used by tests and drills.

These are small functions and one logger class, not a base trainer: each method file writes its own
setup -> train -> save loop and calls what it needs from here.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from diffray.config import FaultsSection, TrainSection
from diffray.errors import DatasetError

STATE_FILE = "trainer_state.json"
VALIDATION = "validation"  # the held-out dataset (data.validation_fraction), read whole by every worker
VALIDATION_STEP = 0  # the noise key of validation losses; training steps are 1, 2, ... so never collide
ARTIFACT_DIR = "artifact"
LOSS_WINDOW = 10


@dataclass
class WorkerEnv:
    rank: int
    world_size: int
    device: torch.device
    precision: str  # fp32 | fp16 | bf16

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dtype(self) -> torch.dtype:
        """dtype for frozen components (VAE, frozen text encoder)."""
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)


def worker_env(mixed_precision: str, use_gpu: bool, cpus_per_worker: float) -> WorkerEnv:
    """Rank, device and precision for this worker; pins torch threads to the CPUs Ray reserved."""
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cpus_per_worker)))
    if use_gpu and torch.cuda.is_available():
        device = ray.train.torch.get_device()
        if mixed_precision == "auto":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = {"no": "fp32"}.get(mixed_precision, mixed_precision)
    else:
        device, precision = torch.device("cpu"), "fp32"  # half precision on CPU is slow and lossy
    return WorkerEnv(ctx.get_world_rank(), ctx.get_world_size(), device, precision)


def place_frozen(module: torch.nn.Module, env: WorkerEnv) -> torch.nn.Module:
    """Move a frozen component to the device, in half precision on GPUs (fp32 stays untouched)."""
    module.to(env.device)
    if env.dtype != torch.float32:
        module.to(dtype=env.dtype)
    return module


def group_by_shape(batches: Iterable[dict[str, np.ndarray]], size: int,
                   buffers: dict[tuple, list[dict]]) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches of `size` rows of one image shape (one aspect bucket), in the order they fill.

    `batches` are numpy batches whose image column (latent_mean, else pixel_values) may mix shapes.
    `buffers` (shape -> pending rows) outlives the call: rows of a bucket still partial at the end of
    an epoch open that bucket's next micro-batch in the following epoch, so every row trains and
    every micro-batch is full.
    """
    for batch in batches:
        key = "latent_mean" if "latent_mean" in batch else "pixel_values"
        for i in range(len(batch[key])):
            row = {k: v[i] for k, v in batch.items()}
            shape = tuple(np.shape(row[key]))
            pending = buffers.setdefault(shape, [])
            pending.append(row)
            if len(pending) == size:
                del buffers[shape]
                yield {k: np.stack([r[k] for r in pending]) for k in pending[0]}


def _epoch_batches(shard, micro_batch_size: int, shuffle: dict, buffers: dict | None) -> Iterator[dict]:
    if buffers is None:
        yield from shard.iter_torch_batches(batch_size=micro_batch_size, drop_last=True, **shuffle)
        return
    numpy_batches = shard.iter_batches(batch_size=micro_batch_size, batch_format="numpy", **shuffle)
    for batch in group_by_shape(numpy_batches, micro_batch_size, buffers):
        yield {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def batch_stream(shard, micro_batch_size: int, skip: int = 0, shuffle_buffer: int = 0,
                 seed: int = 0, buckets: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Endless micro-batches from this worker's dataset shard, epoch after epoch.

    With `shuffle_buffer` > 0 each epoch is reshuffled through a local buffer of that many rows,
    seeded by (seed, epoch), so the order is reproducible for a given shard order. `skip` micro-batches
    are consumed without yielding (resume). Square data: drop_last keeps every rank at the same number
    of batches per epoch, which DDP and ZeRO collectives require. `buckets` (aspect-ratio buckets):
    rows are grouped by shape into full micro-batches (see `group_by_shape`); ranks may then end
    epochs at different steps, which is safe because the stream never ends.
    """
    seen, epoch = 0, 0
    buffers: dict | None = {} if buckets else None
    while True:
        n_epoch = 0
        shuffle = {"local_shuffle_buffer_size": shuffle_buffer,
                   "local_shuffle_seed": (seed * 1_000_003 + epoch) % 2**31} if shuffle_buffer else {}
        for batch in _epoch_batches(shard, micro_batch_size, shuffle, buffers):
            n_epoch += 1
            seen += 1
            if seen > skip:
                yield batch
        if n_epoch == 0 and (buffers is None or sum(map(len, buffers.values())) < micro_batch_size):
            raise DatasetError(f"a worker's data shard has fewer rows than micro_batch_size={micro_batch_size}; "
                               "use a smaller batch, fewer workers or more data")
        epoch += 1


def validation_batches(cfg) -> list[dict[str, torch.Tensor]]:
    """Every held-out row, in micro-batches (with aspect buckets: one shape per batch, partial ones too)."""
    shard = ray.train.get_dataset_shard(VALIDATION)
    mb = cfg.train.micro_batch_size
    if not cfg.data.aspect_buckets:
        return list(shard.iter_torch_batches(batch_size=mb))
    buffers: dict = {}
    full = list(group_by_shape(shard.iter_batches(batch_size=mb, batch_format="numpy"), mb, buffers))
    partial = [{k: np.stack([r[k] for r in rows]) for k in rows[0]} for rows in buffers.values()]
    return [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in b.items()} for b in full + partial]


def data_stream(name: str, cfg, env: WorkerEnv, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """`batch_stream` over this worker's shard of dataset `name`, shuffled as `data.shuffle_buffer` says
    (seeded by run seed, dataset name and rank), grouped by bucket with `data.aspect_buckets`."""
    import zlib

    seed = cfg.run.seed * 7919 + zlib.crc32(name.encode()) % 10_007 * 131 + env.rank
    return batch_stream(ray.train.get_dataset_shard(name), cfg.train.micro_batch_size, skip,
                        cfg.data.shuffle_buffer, seed, cfg.data.aspect_buckets)


def global_mean(value: torch.Tensor) -> float:
    """Mean of a scalar over all ranks. NaN/inf on any rank makes it non-finite on every rank, so
    all ranks see a bad loss at the same step and stop together."""
    t = value.detach().float().reshape(1).cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return float(t.item())


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's global RNG (LoRA dropout) from (seed, step, rank): resumable without RNG state."""
    torch.manual_seed((seed * 1_000_003 + step) * 1_009 + rank)


def advance_state(state: dict[str, Any], step: int, loss: float, step_time: float) -> dict[str, Any]:
    """Trainer state after `step`: the step, training time and the first/last losses for the summary."""
    first = list(state.get("first_losses", []))
    if len(first) < LOSS_WINDOW:
        first.append(loss)
    recent = (list(state.get("recent_losses", [])) + [loss])[-LOSS_WINDOW:]
    return {**state, "step": step, "first_losses": first, "recent_losses": recent,
            "train_time_s": state.get("train_time_s", 0.0) + step_time}


def summary_metrics(state: dict[str, Any]) -> dict[str, float]:
    """Metrics attached to a checkpoint (what the driver's Result.metrics shows)."""
    first, recent = state["first_losses"], state["recent_losses"]
    out = {"step": state["step"], "loss": recent[-1],
           "loss_first_mean": sum(first) / len(first), "loss_last_mean": sum(recent) / len(recent)}
    if "val_loss" in state:
        out["val_loss"], out["val_loss_step"] = state["val_loss"], state["val_loss_step"]
    return out


def card(cfg, model_path: str, state: dict[str, Any]) -> dict[str, Any]:
    """Model card fields common to every method."""
    return {"method": cfg.method, "base_model": cfg.model.path, "base_model_resolved": model_path,
            "steps": state["step"], "metrics": summary_metrics(state),
            "train_time_s": round(state.get("train_time_s", 0.0), 3),
            "config": cfg.model_dump(mode="json")}


class MetricsLogger:
    """Rank 0: metrics to `metrics.jsonl` + TensorBoard + a progress bar. Other ranks: no-ops."""

    def __init__(self, log_dir: str, enabled: bool, total_steps: int, start_step: int, progress_bar: bool):
        self.enabled = enabled
        self.path = Path(log_dir) / "metrics.jsonl"
        self.tb = self.bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(log_dir) / "tensorboard"), purge_step=start_step + 1)
        if progress_bar:
            from ray.experimental.tqdm_ray import tqdm

            self.bar = tqdm(total=total_steps, desc="train", position=0)
            self.bar.update(start_step)

    def event(self, **fields: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"time": time.time(), **fields}) + "\n")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.event(**{**metrics, "step": step})
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.bar is not None:
            self.bar.set_description(f"train loss={metrics.get('loss', float('nan')):.4f}")
            self.bar.update(1)

    def image(self, tag: str, step: int, image) -> None:
        if self.enabled:
            import numpy as np

            self.tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def restore(engine) -> dict[str, Any] | None:
    """Load the latest reported checkpoint into `engine`; returns its trainer state or None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        state = json.loads((Path(d) / STATE_FILE).read_text())
        engine.load(Path(d))
    return state


def save_checkpoint(engine, env: WorkerEnv, state: dict[str, Any], metrics: dict[str, float],
                    faults: FaultsSection, log_dir: str, artifact: Path | None = None) -> None:
    """Write engine state (+ an exported `artifact` dir, rank 0) and report it; all ranks call this.

    Ray registers the checkpoint only after every rank has reported, so a write interrupted by a
    crash never replaces the last good checkpoint. `trainer_state.json` is written last.
    """
    with tempfile.TemporaryDirectory(prefix="diffray-ckpt-") as tmp:
        d = Path(tmp)
        engine.save(d)
        if env.is_main and faults.kill_during_checkpoint_at_step == state["step"]:
            _kill_self_once(Path(log_dir), f"checkpoint-{state['step']}")
        if artifact is not None:
            shutil.copytree(artifact, d / ARTIFACT_DIR)
            shutil.rmtree(artifact, ignore_errors=True)
        if env.is_main:
            (d / STATE_FILE).write_text(json.dumps(state))
        has_files = any(d.iterdir())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if has_files else None)


def maybe_kill_rank(faults: FaultsSection, env: WorkerEnv, step: int, log_dir: str) -> None:
    """Fault injection: SIGKILL this worker once at the configured (rank, step)."""
    k = faults.kill_rank_at_step
    if k is not None and k.rank == env.rank and k.step == step:
        _kill_self_once(Path(log_dir), f"rank{k.rank}-step{k.step}")


def _kill_self_once(log_dir: Path, name: str) -> None:
    # The marker lives in the run's log dir so a restarted worker group does not fire it again.
    marker = log_dir / "faults" / name
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def schedule(train: TrainSection, step: int) -> tuple[bool, bool, bool]:
    """(log, validate, checkpoint) decisions for an optimizer step (1-based)."""
    last = step == train.max_steps
    log = step % train.log_every == 0 or last or step == 1
    validate = train.validate_every is not None and (step % train.validate_every == 0 or last)
    ckpt = step % train.checkpoint_every == 0 or last
    return log, validate, ckpt


class EncoderCalls:
    """Counts VAE encodes and text-encoder forwards on a worker (the latent cache should make both 0).

    `take()` returns the counts since the last `take()` and resets them; the loop takes once at the
    start of a step (dropping validation's calls) and once into the step's metrics.
    """

    def __init__(self, comps):
        self.counts = {"vae_encode_calls": 0, "text_encoder_calls": 0}
        encode = comps.vae.encode

        def counted_encode(*args, **kwargs):
            self.counts["vae_encode_calls"] += 1
            return encode(*args, **kwargs)

        comps.vae.encode = counted_encode
        comps.text_encoder.register_forward_pre_hook(lambda module, args: self._add("text_encoder_calls"))

    def _add(self, key: str) -> None:
        self.counts[key] += 1

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts = dict.fromkeys(self.counts, 0)
        return out
