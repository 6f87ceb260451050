"""Worker-side pieces the training loop and the method tasks share: rank/device setup, the batch
streams, collectives over ranks, the trainer state and its summary, and metrics logging (checkpoint
save + report + restore: `diffray.trainers.checkpoints`).

Small functions and one logger class, not a base trainer: the one loop (`diffray.trainers.loop`) and
the tasks call what they need from here. Runs on Ray Train workers only.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import ray.train
import torch
import torch.distributed as dist

from diffray.config import TrainSection
from diffray.errors import DatasetError
from diffray.models.family import family_of, version_fields
from diffray.trainers import hooks

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


@dataclass
class StepOutput:
    """What a task's `train_step` returns: the step's loss (mean over ranks and micro-batches), metrics
    to log with it, and whether this step must be logged even off the `train.log_every` schedule."""

    loss: float
    metrics: dict[str, Any] = field(default_factory=dict)
    force_log: bool = False


class NonFiniteLoss(Exception):
    """Raised by a task on every rank at once when the step's loss (mean over ranks) is NaN/inf."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"loss {loss} at step {step}")
        self.step, self.loss = step, loss


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
                yield stack_rows(pending)


def stack_rows(rows: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def shard_batches(shard, size: int, drop_last: bool, shuffle: dict, buffers: dict | None,
                  flush: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over a dataset shard in torch micro-batches. `buffers` None: fixed-size rows read
    directly; else rows grouped by shape (aspect buckets, see `group_by_shape`), and with `flush` the
    buckets still partial at the end come out too."""
    if buffers is None:
        yield from shard.iter_torch_batches(batch_size=size, drop_last=drop_last, **shuffle)
        return
    numpy_batches = shard.iter_batches(batch_size=size, batch_format="numpy", **shuffle)
    for batch in group_by_shape(numpy_batches, size, buffers):
        yield to_torch(batch)
    if flush:
        yield from (to_torch(stack_rows(rows)) for rows in buffers.values())


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
        for batch in shard_batches(shard, micro_batch_size, True, shuffle, buffers):
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
    return list(shard_batches(shard, cfg.train.micro_batch_size, False, {}, {} if cfg.data.aspect_buckets else None,
                              flush=True))


def data_stream(name: str, cfg, env: WorkerEnv, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """`batch_stream` over this worker's shard of dataset `name`, shuffled as `data.shuffle_buffer` says
    (seeded by run seed, dataset name and rank), grouped by bucket with `data.aspect_buckets`."""
    seed = cfg.run.seed * 7919 + zlib.crc32(name.encode()) % 10_007 * 131 + env.rank
    return batch_stream(ray.train.get_dataset_shard(name), cfg.train.micro_batch_size, skip,
                        cfg.data.shuffle_buffer, seed, cfg.data.aspect_buckets)


def accumulated_step(engine, step: int, accum: int, next_loss, on_optimizer_step=None) -> float:
    """One optimizer step over `accum` micro-batches (`next_loss()` each); returns the mean loss. The loss
    is averaged over ranks before backward, so a non-finite loss stops every rank at the same step."""
    total = 0.0
    for _ in range(accum):
        loss = hooks.current().loss(step, next_loss())
        mean = global_mean(loss.detach())
        if not math.isfinite(mean):
            raise NonFiniteLoss(step, mean)
        engine.backward(loss)
        if engine.step() and on_optimizer_step is not None:
            on_optimizer_step()
        total += mean / accum
    return total


def global_mean(value: torch.Tensor) -> float:
    """Mean of a scalar over all ranks. NaN/inf on any rank makes it non-finite on every rank, so
    all ranks see a bad loss at the same step and stop together."""
    t = value.detach().float().reshape(1).cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return float(t.item())


def global_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a small CPU tensor over all ranks, in one collective."""
    t = values.detach().cpu().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's global RNG (LoRA dropout) from (seed, step, rank): resumable without RNG state.
    The CPU generator, and every visible GPU's once CUDA is in use (what `torch.manual_seed` seeds; it
    would also queue a lazy CUDA seed with a formatted stack trace on every step of a CPU run)."""
    s = (seed * 1_000_003 + step) * 1_009 + rank
    torch.default_generator.manual_seed(s)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(s)


def initial_state() -> dict[str, Any]:
    return {"step": 0, "first_losses": [], "recent_losses": []}


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


def card(cfg, model_path: str, state: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """Model card fields common to every method (`metrics`: the final checkpoint's). `weights`: the EMA of the
    trained weights (`train.ema_decay`) or the trained weights; `family`: the base model's (/v1/models), with
    an SD base's version (`family.version_fields`: what its kohya export says it needs)."""
    family = family_of(model_path).name
    return {"method": cfg.method, "base_model": cfg.model.path, "base_model_resolved": model_path,
            "family": family, **version_fields(family, model_path),
            "steps": state["step"], "metrics": metrics,
            "train_time_s": round(state.get("train_time_s", 0.0), 3),
            "weights": "trained" if cfg.train.ema_decay is None else f"ema (decay {cfg.train.ema_decay})",
            "config": cfg.model_dump(mode="json")}


class MetricsLogger:
    """Rank 0: metrics to `metrics.jsonl` + TensorBoard. Other ranks: no-ops. (The progress a person
    sees is drawn on the driver, from what rank 0 sends to the run's status actor.)"""

    def __init__(self, log_dir: str, enabled: bool, start_step: int, trackers: list | None = None):
        self.enabled = enabled
        self.path = Path(log_dir) / "metrics.jsonl"
        self.tb = None
        self.trackers = list(trackers or ()) if enabled else []  # `diffray.trainers.tracking`: MLflow, W&B
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(log_dir) / "tensorboard"), purge_step=start_step + 1)

    def event(self, **fields: Any) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"time": time.time(), **fields}) + "\n")

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.event(**{**metrics, "step": step})
        scalars = {f"train/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        for tracker in self.trackers:
            tracker.metrics(step, scalars)

    def image(self, tag: str, step: int, image) -> None:
        if self.enabled:
            self.tb.add_image(tag, np.asarray(image), step, dataformats="HWC")
            for tracker in self.trackers:
                tracker.image(tag, step, image)

    def artifact(self, path: Path) -> None:
        """The exported artifact dir (with its card), to the trackers (TensorBoard has no place for it)."""
        for tracker in self.trackers:
            tracker.artifact(path)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def schedule(train: TrainSection, step: int) -> tuple[bool, bool, bool]:
    """(log, validate, checkpoint) decisions for an optimizer step (1-based)."""
    last = step == train.max_steps
    log = step % train.log_every == 0 or last or step == 1
    validate = train.validate_every is not None and (step % train.validate_every == 0 or last)
    ckpt = step % train.checkpoint_every == 0 or last or step in train.checkpoint_steps
    return log, validate, ckpt


class EncoderCalls:
    """Counts VAE encodes and text-encoder forwards (either encoder) on a worker (the latent cache should
    make both 0).

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
        for encoder in (comps.text_encoder, comps.text_encoder_2):  # SDXL's and Flux's second (T5) count too
            if encoder is not None:
                encoder.register_forward_pre_hook(lambda module, args: self._add("text_encoder_calls"))

    def _add(self, key: str) -> None:
        self.counts[key] += 1

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts = dict.fromkeys(self.counts, 0)
        return out
